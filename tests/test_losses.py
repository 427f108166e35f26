"""
losses.py against independent computations: the v/eps/x conversions round-trip and z_t matches the forward
process written out; the multiscale loss equals a per-level computation written with reshapes (not
avg_pool2d), reduces to MSE / d at one level and down-weights a purely high-frequency error; diffusion_loss
with multiscale=True equals Sec. 3.2's sum for a known network, eps_pred written out here; the loss of a zero
network and of an oracle network have closed forms; the sigmoid weighting equals exp(b) sigmoid(logsnr - b)
on the x-MSE; its default bias is SiD2's per resolution and moves like the schedule's shift beyond it;
d logsnr / dt equals autograd and finite differences of the raw formula; gradients are finite at t = 0
and t = 1; label dropout and the low-discrepancy time draw behave as specified.
"""
import math

import pytest
import torch

from losses import (diffuse, diffusion_loss, dlogsnr_dt, drop_labels, eps_from_v, multiscale_levels,
                    multiscale_mse, sample_t, sid2_sigmoid_bias, v_from_x_eps, x_from_v)
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


def _raw_logsnr(t, name, d, low=32, high=256):
    """Eq. 4-6 written out again (clip +-15 before the shift), independent of schedules.py."""
    t_min, t_max = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    cosine = -2 * torch.log(torch.tan(t_min + t * (t_max - t_min)))
    if name == "cosine":
        return cosine
    if name == "shifted":
        return cosine + 2 * math.log(64 / d)
    return t * (cosine + 2 * math.log(low / d)) + (1 - t) * (cosine + 2 * math.log(high / d))


@pytest.mark.parametrize("name", ["cosine", "shifted", "interpolated"])
def test_dlogsnr_dt_matches_the_raw_formula(name):
    schedule = get_schedule(name, 512)  # interpolated at 512: the paper's bases 32 and 256
    t = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 0.98 + 0.01
    t_ = t.clone().requires_grad_(True)
    (by_autograd,) = torch.autograd.grad(_raw_logsnr(t_, name, 512).sum(), t_)
    assert torch.allclose(dlogsnr_dt(schedule, t), by_autograd, rtol=1e-10)   # the closed-form path
    # the autograd path of dlogsnr_dt (a plain function has no .dlogsnr_dt) against finite differences
    h = 1e-6
    numeric = (_raw_logsnr(t + h, name, 512) - _raw_logsnr(t - h, name, 512)) / (2 * h)
    assert torch.allclose(dlogsnr_dt(lambda u: _raw_logsnr(u, name, 512), t), numeric, rtol=1e-6)


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


def test_low_discrepancy_t_is_uniform_per_example_and_seeded():
    """Each t_i on its own must still be U(0, 1) (an unbiased loss), whole batches must differ, and the
    generator must drive the draw. Kolmogorov-Smirnov against U(0, 1) at the 0.1% level: 1.95 / sqrt(n)."""
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([sample_t(8, "cpu", low_discrepancy=True, generator=g) for _ in range(4000)])
    grid = torch.arange(1, 4001, dtype=torch.float32) / 4000
    for i in (0, 7):
        ks = (torch.sort(draws[:, i]).values - grid).abs().max().item()
        assert ks < 1.95 / math.sqrt(4000), i
    assert len({tuple(row.tolist()) for row in draws[:10]}) == 10
    same = [sample_t(8, "cpu", True, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(*same)


def test_low_discrepancy_t_is_evenly_spaced():
    t = sample_t(16, "cpu", low_discrepancy=True, generator=torch.Generator().manual_seed(0))
    gaps = torch.diff(torch.sort(t).values)
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 16), atol=1e-6)
    assert t.min() >= 0 and t.max() < 1


def _linear_logsnr(t):
    """A schedule that owes nothing to schedules.py: logsnr falls linearly from 6 to -6."""
    return 6.0 - 12.0 * t


def _known_network_and_batch(d, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 3, d, d, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 3, d, d, generator=g, dtype=torch.float64)
    mix = torch.randn(3, 3, generator=g, dtype=torch.float64)
    model = lambda z, logsnr, c: torch.einsum("oc,bchw->bohw", mix, z) + 0.1  # noqa: E731  fixed affine map
    return model, x, eps, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)


def _eps_pred_by_hand(model, x, eps, t):
    """z_t = alpha x + sigma eps and eps_pred = sigma z_t + alpha v_pred, alpha^2 = 1 / (1 + exp(-logsnr))."""
    logsnr = _linear_logsnr(t)[:, None, None, None]
    alpha, sigma = (1 / (1 + torch.exp(-logsnr))).sqrt(), (1 / (1 + torch.exp(logsnr))).sqrt()
    z = alpha * x + sigma * eps
    return sigma * z + alpha * model(z, None, None)


def test_multiscale_loss_of_a_known_network_has_closed_form():
    """Sec. 3.2: sum_s (1/s) mean((D_s[eps_pred] - D_s[eps])^2), pooling each side separately by reshapes."""
    model, x, eps, t = _known_network_and_batch(32)
    eps_pred = _eps_pred_by_hand(model, x, eps, t)
    expected = sum((_pool_by_reshape(eps_pred, s) - _pool_by_reshape(eps, s)).square().mean(dim=(1, 2, 3)) / s
                   for s in (8, 16, 32))
    loss = diffusion_loss(model, x, _linear_logsnr, t=t, eps=eps, multiscale=True, base_d=8)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    plain = diffusion_loss(model, x, _linear_logsnr, t=t, eps=eps, multiscale=False)
    assert torch.allclose(plain.double(), (eps_pred - eps).square().mean(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.all((loss - plain).abs() > 0.1 * plain)  # the flag changes the objective


def test_sid2_sigmoid_bias_at_the_papers_resolutions():
    # SiD2's appendix: b = 0 at 128 px, -1 at 256, -3 at 512 (ImageNet)
    assert [sid2_sigmoid_bias(d) for d in (128, 256, 512)] == pytest.approx([0.0, -1.0, -3.0], abs=1e-12)
    # between them b is linear in log d (181 and 362 are near the geometric midpoints: b near -0.5 and -2)
    assert sid2_sigmoid_bias(181) == pytest.approx(-math.log(181 / 128) / math.log(2), abs=1e-12)
    assert sid2_sigmoid_bias(362) == pytest.approx(-1 - 2 * math.log(362 / 256) / math.log(2), abs=1e-12)
    ds = [8, 16, 24, 32, 64, 100, 128, 200, 256, 300, 512, 700, 1024]
    assert all(a > b for a, b in zip(map(sid2_sigmoid_bias, ds), map(sid2_sigmoid_bias, ds[1:])))
    with pytest.raises(ValueError):
        sid2_sigmoid_bias(0)


@pytest.mark.parametrize("small, big", [(8, 128), (32, 128), (64, 128), (512, 1024), (512, 4096)])
def test_sid2_sigmoid_bias_moves_like_the_schedule_shift(small, big):
    """Beyond SiD2's range (one width of each pair is inside it) the weight must follow a noise level across
    resolutions: pooling the big image to the small one's size (s = big / small) multiplies its SNR by s^2,
    which is exactly how far apart the two shifted schedules (Eq. 5) are at every t, and the two models
    must weight those matching levels alike."""
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    logsnr_small, logsnr_big = _raw_logsnr(t, "shifted", small), _raw_logsnr(t, "shifted", big)
    pooled_big = torch.log(torch.exp(logsnr_big) * (big / small) ** 2)
    assert torch.allclose(pooled_big, logsnr_small, atol=1e-9)
    weight_small = torch.sigmoid(sid2_sigmoid_bias(small) - logsnr_small)
    weight_big = torch.sigmoid(sid2_sigmoid_bias(big) - logsnr_big)
    assert torch.allclose(weight_small, weight_big, atol=1e-12)


def test_default_sigmoid_bias_follows_the_resolution():
    """No bias given: SiD2's b = 0 at 128 px moved to 16 px by the shift, 2 log(128 / 16), weighted by the
    Jacobian of the linear schedule (12) and the eps-MSE written out here."""
    model, x, eps, t = _known_network_and_batch(16, seed=8)
    eps_mse = (_eps_pred_by_hand(model, x, eps, t) - eps).square().mean(dim=(1, 2, 3))
    expected = 12.0 * torch.sigmoid(2 * math.log(128 / 16) - _linear_logsnr(t)) * eps_mse
    loss = diffusion_loss(model, x, _linear_logsnr, t=t, eps=eps, weighting="sigmoid")
    assert torch.allclose(loss.double(), expected, rtol=1e-5)


def test_bad_weighting_is_rejected():
    with pytest.raises(ValueError, match="weighting"):
        diffusion_loss(lambda z, l, c: z, torch.zeros(1, 3, 8, 8), get_schedule("cosine", 8), weighting="snr")
