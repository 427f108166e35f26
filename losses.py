"""
The training objective: v-prediction, the eps loss, the multiscale loss and the sigmoid weighting.

The idea. Training a diffusion model is regression: draw a time t, noise the image to
z_t = alpha_t x + sigma_t eps, and ask the network what the noise was. Simple diffusion's network outputs
v = alpha eps - sigma x (Salimans & Ho's v-parameterisation: a well-scaled target at every noise level),
but the loss is measured on eps, as in the authors' appendix code. Sec. 3.2 adds a multiscale loss: at high
resolution the per-pixel MSE is dominated by high frequencies (there are many more fine-scale than
coarse-scale degrees of freedom), so the error is also measured after average-pooling to 32x32, 64x64, ...,
each scale weighted by 1/s, which lets the coarse structure count. The sigmoid weighting is Kingma & Gao's
(2023): with the Jacobian -d logsnr/dt the loss becomes an integral over logsnr, the same for any schedule,
and sigmoid(b - logsnr) decides which noise levels count. SiD2's recipe starts with it ("use the sigmoid
loss-weighting with our prescribed hyper-parameters", abstract) and tunes the bias b per resolution.

Equations:
    z_t     = alpha x + sigma eps                                   (Sec. 2, variance preserving)
    v       = alpha eps - sigma x;  x = alpha z - sigma v;  eps = sigma z + alpha v   (v-param.)
    L_eps   = mean_pixels (eps - eps_pred)^2                        (appendix code)
    L_multi = sum_{s in {32, 64, ..., d}} (1/s) mean_pixels (D_s[eps] - D_s[eps_pred])^2     (Sec. 3.2)
    L_sig   = (-d logsnr/dt) sigmoid(b - logsnr) L_eps              (Kingma & Gao 2023; SiD2)
            = (-d logsnr/dt) exp(b) sigmoid(logsnr - b) mean (x - x_pred)^2,  since |eps err|^2 = SNR |x err|^2
SiD2 writes the second (x-space) form; our b is its b, same sign. Both papers carry a factor 1/2, dropped here.

Symbols: x -> x, epsilon -> eps, z_t -> z_t, v_hat -> v_pred, D_s (average pooling to s x s) ->
_avg_pool_to, lambda_t -> logsnr, the sigmoid bias b -> sigmoid_bias.

Choices the papers leave open:
- b for any width d (sid2_sigmoid_bias): SiD2's tuned values at 128, 256, 512 (its appendix), log-linear in
  between; beyond them the nearest value moves like the schedule, b_ref + 2 log(d_ref / d) (simple
  diffusion's Eq. 5 shift), so a pooled view keeps its weight. SiD2's own values fall by 3.0 from 128 to 512
  where that shift predicts 2.8. A 32 px model gets b = 2 log 4 = 2.8.
- multiscale levels are d, d/2, d/4, ... down to base_d ({32, ..., d} for powers of two; {48, 96} at 96).
  At d <= base_d the single level is the plain MSE times 1/d. Adam ignores the overall 1/d-ish scale, but
  logged numbers differ from the plain MSE.
- t is uniform; `low_discrepancy=True` is VDM's draw (one uniform offset, B evenly spaced points mod 1).
- Label dropout for classifier-free guidance lives here (`drop_labels`), because it is part of the
  objective: the same network learns p(x | class) and p(x) (the null class).
"""
import math

import torch
import torch.nn.functional as F

from schedules import alpha_sigma


def _per_example(logsnr: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha, sigma for a (B,) logsnr, shaped (B, 1, 1, 1) to broadcast against (B, C, H, W)."""
    return alpha_sigma(logsnr.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype))


def diffuse(x: torch.Tensor, logsnr: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Forward process q(z_t | x): z_t = alpha x + sigma eps (Sec. 2)."""
    alpha, sigma = _per_example(logsnr, x)
    return alpha * x + sigma * eps


def v_from_x_eps(x: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """The v target: v = alpha eps - sigma x."""
    alpha, sigma = _per_example(logsnr, x)
    return alpha * eps - sigma * x


def x_from_v(z_t: torch.Tensor, v: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """x = alpha z - sigma v (exact because alpha^2 + sigma^2 = 1)."""
    alpha, sigma = _per_example(logsnr, z_t)
    return alpha * z_t - sigma * v


def eps_from_v(z_t: torch.Tensor, v: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """eps = sigma z + alpha v."""
    alpha, sigma = _per_example(logsnr, z_t)
    return sigma * z_t + alpha * v


def _avg_pool_to(x: torch.Tensor, s: int) -> torch.Tensor:
    """D_s: average pooling of (B, C, d, d') by the factor d // s, so the height becomes s."""
    k = x.shape[-2] // s
    return x if k == 1 else F.avg_pool2d(x, k)  # (B, C, s, s * W / H)


def multiscale_levels(d: int, base_d: int = 32) -> list[int]:
    """The resolutions s of Sec. 3.2's sum: d, d/2, ... while s >= base_d and s divides d exactly."""
    levels = [d]
    while levels[-1] % 2 == 0 and levels[-1] // 2 >= base_d:
        levels.append(levels[-1] // 2)
    return levels[::-1]


def multiscale_mse(eps_pred: torch.Tensor, eps: torch.Tensor, base_d: int = 32) -> torch.Tensor:
    """Sec. 3.2: sum_s (1/s) * per-pixel MSE after pooling both to s x s. Pooling is linear, so the
    difference is pooled once per level. Returns the per-example loss, (B,)."""
    diff = (eps_pred - eps).float()
    loss = diff.new_zeros(diff.shape[0])
    for s in multiscale_levels(diff.shape[-2], base_d):
        loss = loss + _avg_pool_to(diff, s).square().mean(dim=(1, 2, 3)) / s
    return loss


# SiD2's tuned sigmoid bias b per image width d (its appendix; ImageNet 128, 256, 512), as (d, b).
SID2_SIGMOID_BIAS = ((128, 0.0), (256, -1.0), (512, -3.0))


def _log_linear(d: float, table) -> float:
    """Interpolate b linearly in log d between the (d, b) rows of a table that brackets d."""
    for (d0, b0), (d1, b1) in zip(table, table[1:]):
        if d <= d1:
            return b0 + (b1 - b0) * math.log(d / d0) / math.log(d1 / d0)
    return table[-1][1]


def sid2_sigmoid_bias(image_d: int) -> float:
    """The bias b for a d x d image: SiD2's value where it gives one, log-linear in d in between, and
    beyond its range the nearest value shifted like the schedule (Eq. 5): a d px image pooled to d_ref px
    sees logsnr + 2 log(d / d_ref), so the same weight on that pooled view needs b_ref + 2 log(d_ref / d)."""
    if image_d < 1:
        raise ValueError(f"image_d must be a positive width in pixels, got {image_d}")
    d_ref = min(max(image_d, SID2_SIGMOID_BIAS[0][0]), SID2_SIGMOID_BIAS[-1][0])  # nearest covered width
    return _log_linear(d_ref, SID2_SIGMOID_BIAS) + 2.0 * math.log(d_ref / image_d)


def sigmoid_weight(logsnr: torch.Tensor, dlogsnr_dt: torch.Tensor, bias: float) -> torch.Tensor:
    """Kingma & Gao's eps-space weight (-d logsnr/dt) * sigmoid(b - logsnr), as SiD2 uses it. The Jacobian
    -d logsnr/dt turns a uniform t into the integral over logsnr that Kingma & Gao weight; sigmoid(b - logsnr)
    ~ 1 at high noise and decays as exp(b - logsnr) once the image is cleaner than logsnr = b."""
    return -dlogsnr_dt * torch.sigmoid(bias - logsnr)


def dlogsnr_dt(logsnr_fn, t: torch.Tensor) -> torch.Tensor:
    """d logsnr / dt: the schedule's closed form if it has one, else autograd through logsnr_fn."""
    if hasattr(logsnr_fn, "dlogsnr_dt"):
        return logsnr_fn.dlogsnr_dt(t)
    with torch.enable_grad():
        t_ = t.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(logsnr_fn(t_).sum(), t_)
    return grad


def sample_t(batch: int, device, low_discrepancy: bool = False, generator=None) -> torch.Tensor:
    """t ~ U(0, 1) per example; VDM's low-discrepancy variant covers [0, 1) evenly within a batch."""
    u = torch.rand(1 if low_discrepancy else batch, device=device, generator=generator)
    if not low_discrepancy:
        return u
    return torch.remainder(u + torch.arange(batch, device=device) / batch, 1.0)


def drop_labels(class_labels: torch.Tensor, p: float, null_label: int, generator=None) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans): replace each label by the null class with
    probability p, so one network learns both the conditional and the unconditional model."""
    drop = torch.rand(class_labels.shape, device=class_labels.device, generator=generator) < p
    return torch.where(drop, torch.full_like(class_labels, null_label), class_labels)


def diffusion_loss(model, x: torch.Tensor, logsnr_fn, class_labels: torch.Tensor | None = None,
                   multiscale: bool = False, weighting: str = "eps", sigmoid_bias: float | None = None,
                   base_d: int = 32, low_discrepancy: bool = False,
                   t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    """One Monte Carlo draw of the training loss for a batch of clean images x in [-1, 1], (B, C, H, W).
    `model(z_t, logsnr, class_labels)` returns v_pred. Returns the per-example loss (B,); the caller
    takes the mean. sigmoid_bias None means sid2_sigmoid_bias(W) for the image width W. Pass `t` and `eps`
    to make it deterministic (tests do)."""
    if weighting not in ("eps", "sigmoid"):
        raise ValueError(f"weighting must be 'eps' or 'sigmoid', got {weighting!r}")
    if t is None:
        t = sample_t(x.shape[0], x.device, low_discrepancy)
    if eps is None:
        eps = torch.randn_like(x)
    logsnr = logsnr_fn(t)                                    # (B,)
    z_t = diffuse(x, logsnr, eps)                            # (B, C, H, W)
    v_pred = model(z_t, logsnr, class_labels)
    eps_pred = eps_from_v(z_t, v_pred.to(z_t.dtype), logsnr)  # the loss lives in eps space (appendix)
    if multiscale:
        loss = multiscale_mse(eps_pred, eps, base_d)
    else:
        loss = (eps_pred - eps).float().square().mean(dim=(1, 2, 3))
    if weighting == "sigmoid":
        bias = sid2_sigmoid_bias(x.shape[-1]) if sigmoid_bias is None else sigmoid_bias
        loss = loss * sigmoid_weight(logsnr, dlogsnr_dt(logsnr_fn, t), bias).float()
    return loss
