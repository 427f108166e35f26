"""
Noise schedules in logSNR form: cosine, shifted and interpolated (simple diffusion, Sec. 3.1).

The idea. A variance-preserving diffusion destroys an image x in [-1, 1] as z_t = alpha_t x + sigma_t eps,
and the whole schedule is one curve: the log signal-to-noise ratio logsnr(t) = log(alpha_t^2 / sigma_t^2),
falling from "clean" at t = 0 to "pure noise" at t = 1. The cosine schedule was designed on 32x32 and 64x64
images; at 512x512 it adds too little noise. Neighbouring pixels share almost the same signal but carry
independent noise, so averaging an s x s window keeps the signal, divides the noise variance by s^2 and
multiplies the SNR by s^2 (2x2: variance / 4, SNR x 4). Pooled down to 64x64 (s = d / 64), a d x d image
therefore has logSNR + 2 log(d / 64): at the scale of objects a 512x512 image sees 64 times the SNR the
cosine schedule meant. Simple diffusion's fix is to shift the curve by 2 log(64 / d), so that the pooled
image sees exactly the 64x64 cosine schedule (tests/test_schedules.py runs that experiment).

Equations (simple diffusion -> here):
    Eq. 4   logsnr_cosine(t)  = -2 log tan(u),  u = t_min + t (t_max - t_min), i.e. -2 log tan(pi t / 2)
            with t squeezed so that the curve stays in [logsnr_min, logsnr_max] (the appendix code):
            t_min = atan(exp(-logsnr_max / 2)),  t_max = atan(exp(-logsnr_min / 2))
    Eq. 5   logsnr_shifted(t) = logsnr_cosine(t) + 2 log(noise_d / image_d)
    Eq. 6   logsnr_interp(t)  = t logsnr_shifted(t; noise_d_low) + (1 - t) logsnr_shifted(t; noise_d_high)
            alpha^2 = sigmoid(logsnr),  sigma^2 = sigmoid(-logsnr)   (so alpha^2 + sigma^2 = 1)

Symbols:  t -> t,  lambda_t / logSNR(t) -> logsnr,  alpha_t -> alpha,  sigma_t -> sigma,
          d (image width) -> image_d,  the reference width 64 -> noise_d.

About Eq. 6. The printed equation puts the high-resolution base on the t factor; the authors' appendix
pseudo-code multiplies t with the *low* base: a strong shift near pure noise (t = 1), where global structure
is decided, and a weak one near clean data, where the fine detail lives, which is what the text motivates
("interpolating schedules can be used to include higher frequency details"). We follow the code. The paper's
bases are 32 and 256, a high-resolution setting. get_schedule keeps them and caps each at image_d
(interpolated_bases, our choice): below 256 px an uncapped 256 base would shift towards *less* noise than
the cosine schedule. A Schedule built directly keeps 32/256, so saved schedules load unchanged.

Choices the paper leaves open: logsnr is clipped to [-15, 15] before the shift and not re-clipped after it,
as in the appendix code, so the shift moves the endpoints too (some ports re-clip the shifted curve).

Run `python schedules.py --res 512` for a table; `pytest tests/test_schedules.py` for the proofs.
"""
import argparse
import math
from dataclasses import dataclass

import torch


def _t_range(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    """The interval of pi t / 2 inside which -2 log tan stays within [logsnr_min, logsnr_max]."""
    return math.atan(math.exp(-0.5 * logsnr_max)), math.atan(math.exp(-0.5 * logsnr_min))


def logsnr_cosine(t: torch.Tensor, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> torch.Tensor:
    """Eq. 4: the alpha-cosine schedule alpha_t = cos(pi t / 2) written as a logSNR, clipped."""
    t_min, t_max = _t_range(logsnr_min, logsnr_max)
    return -2.0 * torch.log(torch.tan(t_min + t * (t_max - t_min)))


def dlogsnr_cosine_dt(t: torch.Tensor, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> torch.Tensor:
    """d logsnr_cosine / dt in closed form. With u = t_min + t (t_max - t_min):
    d/dt [-2 log tan u] = -2 (t_max - t_min) / (sin u cos u) = -4 (t_max - t_min) / sin 2u.
    The shift is a constant, so shifted schedules share this derivative. Used by the sigmoid weighting."""
    t_min, t_max = _t_range(logsnr_min, logsnr_max)
    return -4.0 * (t_max - t_min) / torch.sin(2.0 * (t_min + t * (t_max - t_min)))


def logsnr_shifted(t: torch.Tensor, image_d: int, noise_d: int = 64,
                   logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> torch.Tensor:
    """Eq. 5: the cosine schedule shifted so that image_d x image_d, pooled to noise_d, sees the cosine
    schedule. The shift is negative (more noise) for image_d > noise_d."""
    return logsnr_cosine(t, logsnr_min, logsnr_max) + 2.0 * math.log(noise_d / image_d)


def logsnr_interpolated(t: torch.Tensor, image_d: int, noise_d_low: int = 32, noise_d_high: int = 256,
                        logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> torch.Tensor:
    """Eq. 6 as the appendix code has it (see the module docstring): the strongly shifted schedule
    (base noise_d_low) at t = 1, the weakly shifted one (base noise_d_high) at t = 0."""
    low = logsnr_shifted(t, image_d, noise_d_low, logsnr_min, logsnr_max)
    high = logsnr_shifted(t, image_d, noise_d_high, logsnr_min, logsnr_max)
    return t * low + (1.0 - t) * high


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr). torch.sigmoid never forms 1 - x, so sigma
    keeps full relative precision near clean data (logsnr = +15) and alpha near pure noise (-15)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


@dataclass(frozen=True)
class Schedule:
    """A named schedule bound to a resolution: a plain t -> logsnr function that also knows its
    derivative. Frozen and made of primitives, so it prints, compares and goes into a checkpoint."""
    name: str                 # "cosine" | "shifted" | "interpolated"
    image_d: int              # image width d in pixels
    noise_d: int = 64         # reference width of the shifted schedule (Sec. 3.1)
    noise_d_low: int = 32     # interpolated: base at t = 1 (get_schedule caps it: interpolated_bases)
    noise_d_high: int = 256   # interpolated: base at t = 0
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        clip = (self.logsnr_min, self.logsnr_max)
        if self.name == "cosine":
            return logsnr_cosine(t, *clip)
        if self.name == "shifted":
            return logsnr_shifted(t, self.image_d, self.noise_d, *clip)
        return logsnr_interpolated(t, self.image_d, self.noise_d_low, self.noise_d_high, *clip)

    def dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        """Analytic derivative (tests compare it with finite differences and autograd of Eq. 4-6)."""
        d_cos = dlogsnr_cosine_dt(t, self.logsnr_min, self.logsnr_max)
        if self.name != "interpolated":
            return d_cos
        # d/dt [t L_low + (1 - t) L_high] = (L_low - L_high) + d_cos, since L_low' = L_high' = d_cos,
        # and L_low - L_high = 2 log(noise_d_low / noise_d_high) for every t.
        return 2.0 * math.log(self.noise_d_low / self.noise_d_high) + d_cos


SCHEDULES = ("cosine", "shifted", "interpolated")

# The two bases simple diffusion names for its interpolated schedule (Sec. 3.1), low then high.
PAPER_INTERPOLATED_BASES = (32, 256)


def interpolated_bases(image_d: int) -> tuple[int, int]:
    """(noise_d_low, noise_d_high) for a d x d image: the paper's (32, 256), each capped at image_d (ours).
    A base b adds 2 log(b / d) to logsnr, so the cap keeps both ends at or below the cosine schedule's SNR;
    at d <= 32 the interpolated schedule is the cosine schedule itself."""
    low, high = PAPER_INTERPOLATED_BASES
    return min(low, image_d), min(high, image_d)


def get_schedule(name: str, image_d: int, **kwargs) -> Schedule:
    """Pick a schedule by name for a resolution, e.g. get_schedule("shifted", image_d=256). The interpolated
    schedule's bases default to interpolated_bases(image_d); keyword arguments override any field."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if image_d < 1:
        raise ValueError(f"image_d must be a positive width in pixels, got {image_d}")
    if name == "interpolated":
        low, high = interpolated_bases(image_d)
        kwargs = {"noise_d_low": low, "noise_d_high": high, **kwargs}
    return Schedule(name, image_d, **kwargs)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Print the cosine, shifted and interpolated logSNR schedules.")
    p.add_argument("--res", type=int, default=512, help="image width d")
    p.add_argument("--noise-d", type=int, default=64, help="reference width of the shifted schedule")
    p.add_argument("--rows", type=int, default=11, help="number of t values in [0, 1]")
    args = p.parse_args()
    t = torch.linspace(0, 1, args.rows, dtype=torch.float64)
    low, high = interpolated_bases(args.res)
    print(f"image_d = {args.res}: shift = 2 log({args.noise_d}/{args.res}) = "
          f"{2 * math.log(args.noise_d / args.res):+.3f}; interpolated bases {low} (t = 1) and {high} (t = 0)")
    print(f"{'':6}" + "".join(f"{n:>27}" for n in SCHEDULES))
    print(f"{'t':>6}" + "   logsnr   alpha   sigma" * len(SCHEDULES))
    for i, ti in enumerate(t):
        row = f"{ti.item():6.2f}"
        for name in SCHEDULES:
            logsnr = get_schedule(name, args.res, noise_d=args.noise_d)(t)[i]
            alpha, sigma = alpha_sigma(logsnr)
            row += f" {logsnr.item():8.3f} {alpha.item():7.4f} {sigma.item():7.4f}"
        print(row)
