"""
Sampling: the ancestral DDPM sampler in logSNR form, with classifier-free guidance (Sec. 2 and App.).

The idea. Sampling runs the diffusion backwards. Start from pure noise z_1 ~ N(0, I); at each step ask the
network for its guess of the clean image, x_pred = E[x | z_t], and take one draw from the forward
process's own posterior q(z_s | z_t, x) with x replaced by x_pred. That posterior is Gaussian with a
closed form (VDM, Kingma et al. 2021), so the whole sampler is one small formula applied `steps` times
on the grid t = 1, 1 - 1/steps, ..., 0; the last step returns x_pred itself. Simple diffusion samples
exactly like this (the authors' appendix code), only with the shifted schedule of schedules.py.

Equations, with SNR = exp(logsnr), alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr), s < t:
    VDM:  alpha_{t|s} = alpha_t / alpha_s,   sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2
          q(z_s | z_t, x) = N(mu, var),  var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2,
            mu = (alpha_{t|s} sigma_s^2 / sigma_t^2) z_t + (alpha_s sigma_{t|s}^2 / sigma_t^2) x
    logSNR form (same thing): c = sigma_{t|s}^2 / sigma_t^2 = 1 - SNR_t / SNR_s = -expm1(logsnr_t - logsnr_s)
          mu = alpha_s (z_t (1 - c) / alpha_t + c x_pred),   var = c sigma_s^2          (ddpm_step)
    x_pred = alpha z_t - sigma v_pred, clipped to [-1, 1]                             (v-parameterisation)
    guidance (Ho & Salimans): eps = (1 + w) eps(z, class) - w eps(z, null), only for t in [t_lo, t_hi]
          (the guidance interval of Kynkaanniemi et al. 2024, used by SiD2); w = 0 is plain sampling.

Symbols: z_t -> z_t, x_hat -> x_pred, v_hat -> v_pred, lambda_t -> logsnr_t, w -> guidance,
         the null class -> label num_classes (the model contract in unet.py / uvit.py).

Why guidance may combine v. eps = sigma z + alpha v and x = alpha z - sigma v are affine in v with the
same z term for both passes, and the guidance weights (1 + w) and -w sum to 1. So
(1 + w) eps_c - w eps_u = sigma z + alpha ((1 + w) v_c - w v_u): guiding eps, x or v is the same
operation. We combine v, then convert once (tests/test_sample.py checks this against eps-space guidance).

Sampling on another time grid (--schedule). The network is told logsnr, not t, so the sampler may walk any
falling logsnr grid: the schedule used for sampling only decides where the `steps` steps fall (EDM likewise
separates the training noise distribution from the sampling steps). --schedule keeps the uniform t grid and
maps it through another schedule at the checkpoint's resolution; where that reaches log-SNRs the network
never trained on (a shift moves the clipped ends, e.g. by 2 log(64/128) at 128 px), the network extrapolates.

Choices the paper leaves open: the step count (CLI default 256; the paper reports up to 1000 and SiD2 512);
x_pred clipped to [-1, 1] at every step (the appendix code does; --no-clip-x turns it off); guidance is
off outside [t_lo, t_hi] (eps_cond is used) and the unconditional pass is skipped there, so it costs
nothing; z_1 ~ N(0, I) although q(z_1) is N(alpha_1 x, sigma_1^2) (alpha_1^2 ~ 1e-6 or less); a conditional
model sampled without --class gives seed s the class s % num_classes (balanced, and independent of the
batch size). Per-image seeds: image i draws z_1 and all its step noise from its own torch.Generator seeded
by seeds[i], so images do not depend on the batch size or the number of GPUs (bit-identical for a
batch-independent network; a GPU generator gives other numbers than a CPU one for the same seed).

Run: `python sample.py` (newest run under ./runs -> a PNG grid), `python sample.py --help`,
`torchrun --nproc_per_node=8 sample.py --ckpt RUN --num-images 50000 --out-dir DIR` (each rank draws every
world-th seed); test: `pytest tests/test_sample.py`.
"""
import argparse
import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from checkpoint import find_latest_run, load_model
from distributed import setup_distributed
from data import add_config_flags, config_from_args, error_exit_code, flag, save_grid, save_png, to_uint8
from losses import x_from_v
from schedules import SCHEDULES, Schedule, alpha_sigma, get_schedule

# ----------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------

def _bcast(logsnr: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) or scalar logsnr shaped (B, 1, 1, 1) to broadcast against (B, C, H, W)."""
    return torch.as_tensor(logsnr, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def ddpm_step(z_t: torch.Tensor, x_pred: torch.Tensor, logsnr_t: torch.Tensor, logsnr_s: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """One ancestral step z_t -> z_s (s < t, so logsnr_s > logsnr_t): a draw from q(z_s | z_t, x = x_pred).
    Pure: the caller passes the standard-normal `noise`, so the step is deterministic and testable.
    The coefficients are computed in logsnr's dtype, then cast to z_t's."""
    logsnr_t, logsnr_s = _bcast(logsnr_t, z_t), _bcast(logsnr_s, z_t)
    c = -torch.expm1(logsnr_t - logsnr_s)            # c = 1 - SNR_t / SNR_s = sigma_{t|s}^2 / sigma_t^2 (VDM)
    alpha_t, _ = alpha_sigma(logsnr_t)
    alpha_s, sigma_s = alpha_sigma(logsnr_s)
    coef_z = (alpha_s * (1 - c) / alpha_t).to(z_t.dtype)      # = alpha_{t|s} sigma_s^2 / sigma_t^2
    coef_x = (alpha_s * c).to(z_t.dtype)                      # = alpha_s sigma_{t|s}^2 / sigma_t^2
    std = (c * sigma_s.square()).sqrt().to(z_t.dtype)         # var = c sigma_s^2 = sigma_{t|s}^2 sigma_s^2/sigma_t^2
    return coef_z * z_t + coef_x * x_pred + std * noise       # mu + sqrt(var) noise


def guided_v(model, z_t: torch.Tensor, logsnr_t: torch.Tensor, class_labels: torch.Tensor | None,
             guidance: float, null_label: int | None) -> torch.Tensor:
    """v_pred with classifier-free guidance: (1 + w) v(z, class) - w v(z, null), which equals guiding eps
    or x (see the module docstring). Both passes go through the network as one batch of 2B. With w = 0
    only the conditional pass runs, so "no guidance" is exactly the plain model call."""
    if guidance == 0 or class_labels is None:
        return model(z_t, logsnr_t, class_labels).to(z_t.dtype)
    null = torch.full_like(class_labels, null_label)
    v_both = model(torch.cat([z_t, z_t]), torch.cat([logsnr_t, logsnr_t]),
                   torch.cat([class_labels, null])).to(z_t.dtype)      # (2B, C, H, W)
    v_cond, v_uncond = v_both.chunk(2)                                   # (B, C, H, W) each
    return (1 + guidance) * v_cond - guidance * v_uncond


def _model_device(model) -> torch.device:
    """Where the network's weights live (CPU for a plain callable such as the tests' exact denoisers)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    return next(params, torch.empty(0)).device


@torch.no_grad()
def sample(model, shape, logsnr_fn, steps: int, class_labels: torch.Tensor | None = None,
           guidance: float = 0.0, guidance_interval=(0.0, 1.0), clip_x: bool = True, seeds=None,
           progress: bool = True, device=None) -> torch.Tensor:
    """Draw images (B, C, H, W) with `steps` ancestral steps from t = 1 to 0.

    model(z_t, logsnr, class_labels) -> v_pred: any callable with the model contract (the tests pass
    exact analytic denoisers); for guidance it needs `.num_classes` (the null label). The caller sets
    eval mode. logsnr_fn maps t (B,) -> logsnr (B,), e.g. a schedules.Schedule. seeds: one int per image
    (default: drawn from torch's global RNG). Returns x_pred of the last step, in [-1, 1] if clip_x."""
    b = shape[0]
    t_lo, t_hi = guidance_interval
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if not 0.0 <= t_lo <= t_hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got {guidance_interval}")
    num_classes = getattr(model, "num_classes", 0)
    if class_labels is not None and not num_classes:
        raise ValueError("class labels given, but the model is unconditional (num_classes = 0)")
    if guidance != 0 and (class_labels is None or not num_classes):
        raise ValueError("guidance needs a class-conditional model and class labels")
    seeds = torch.randint(2**62, (b,)).tolist() if seeds is None else [int(s) for s in seeds]
    if len(seeds) != b:
        raise ValueError(f"got {len(seeds)} seeds for {b} images")
    device = torch.device(device) if device is not None else _model_device(model)
    if class_labels is not None:
        class_labels = class_labels.to(device)

    # One generator per image: image i's noise depends on seeds[i] only, never on its batch neighbours.
    gens = [torch.Generator(device).manual_seed(s) for s in seeds]
    def draw_noise():
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in gens])  # (B, C, H, W)

    # t_i = (steps - i) / steps in Python floats: the exact linspace(1, 0, steps + 1), so an interval edge
    # such as 0.3 = 3/10 compares equal to the grid point instead of missing it by a rounding error.
    ts = [(steps - i) / steps for i in range(steps + 1)]
    z_t = draw_noise()                                                   # z_1 ~ N(0, I)
    for i in tqdm(range(steps), disable=not progress, unit="step", leave=False, desc=f"{b} images"):
        logsnr_t = logsnr_fn(torch.full((b,), ts[i], device=device))     # (B,)
        w = guidance if t_lo <= ts[i] <= t_hi else 0.0                   # guidance interval (in t)
        v_pred = guided_v(model, z_t, logsnr_t, class_labels, w, num_classes)
        x_pred = x_from_v(z_t, v_pred, logsnr_t)                         # x = alpha z - sigma v
        if clip_x:
            x_pred = x_pred.clamp(-1.0, 1.0)
        if i == steps - 1:
            break                                                        # the last step returns x_pred
        logsnr_s = logsnr_fn(torch.full((b,), ts[i + 1], device=device))
        z_t = ddpm_step(z_t, x_pred, logsnr_t, logsnr_s, draw_noise())   # z_s ~ q(z_s | z_t, x_pred)
    return x_pred


# ----------------------------------------------------------------------------------------------------
# Command line: python sample.py [--ckpt RUN_DIR_OR_FILE] [--out grid.png] [--out-dir DIR] ...
# ----------------------------------------------------------------------------------------------------

@dataclass
class SampleConfig:
    ckpt: str = flag("", "checkpoint file or run folder (its newest valid checkpoint); default: the newest run "
                         "under ./runs")
    num_images: int = flag(64, "number of images (seeds seed .. seed + num_images - 1)")
    steps: int = flag(256, "ancestral sampling steps")
    batch_size: int = flag(64, "images per forward pass (per GPU)")
    guidance: float = flag(0.0, "classifier-free guidance weight w (0 = none)")
    guidance_interval: tuple = flag((0.0, 1.0), "T_LO T_HI: apply guidance only for t in [T_LO, T_HI]",
                                    metavar=("T_LO", "T_HI"))
    class_label: str = flag("", "class index or class folder name (default: seed % num_classes)", name="--class")
    seed: int = flag(0, "first seed; image i uses seed + i")
    out: str = flag("", "PNG grid path (default: RUN_DIR/sample_<step>.png when --out-dir is not given)")
    out_dir: str = flag("", "folder for one PNG per image, named <seed>.png")
    resume: bool = flag(False, "--out-dir: skip seeds whose PNG already exists")
    overwrite: bool = flag(False, "--out-dir: rewrite seeds whose PNG exists")
    weights: str = flag("ema", "ema or raw", choices=("ema", "raw"))
    res: int = flag(0, "must equal the checkpoint's resolution (0 = the checkpoint's)")
    schedule: str = flag("", "sample on another schedule's time grid (cosine, shifted, interpolated, at the "
                             "checkpoint's resolution); '' = the one it was trained with")
    clip_x: bool = flag(True, "clip x_pred to [-1, 1] at every step")
    bf16: bool = flag(True, "bf16 autocast for the network on CUDA (ignored on CPU)")
    device: str = flag("", "cpu, cuda, cuda:1, ... (default: cuda:LOCAL_RANK if any)")


def parse_config(argv=None) -> SampleConfig:
    parser = argparse.ArgumentParser(description="Sample images from a simple-diffusion checkpoint "
                                     "(ancestral DDPM, optional classifier-free guidance).")
    add_config_flags(parser, SampleConfig)
    return config_from_args(SampleConfig, vars(parser.parse_args(argv)))


def resolve_class(spec: str, num_classes: int, class_names) -> int | None:
    """--class as a class folder name (checked first) or an index; None if not given."""
    if spec == "":
        return None
    names = list(class_names or [])
    listing = ", ".join(f"{i}={name}" for i, name in enumerate(names)) if names else f"0..{num_classes - 1}"
    if num_classes == 0:
        raise ValueError(f"--class {spec}: the checkpoint's model is unconditional (num_classes = 0); drop --class")
    if spec in names:
        return names.index(spec)
    if re.fullmatch(r"-?\d+", spec) and 0 <= int(spec) < num_classes:
        return int(spec)
    raise ValueError(f"--class {spec}: not a class of this checkpoint; valid: {listing}")


def check_config(cfg: SampleConfig) -> None:
    """Errors that need no checkpoint: fail before loading anything."""
    if cfg.steps < 1:
        raise ValueError(f"--steps {cfg.steps}: need at least 1 sampling step")
    if cfg.num_images < 1 or cfg.batch_size < 1:
        raise ValueError(f"--num-images {cfg.num_images} --batch-size {cfg.batch_size}: both must be >= 1")
    lo, hi = cfg.guidance_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--guidance-interval {lo} {hi}: need 0 <= T_LO <= T_HI <= 1")
    if cfg.schedule and cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule {cfg.schedule}: not a schedule; choose one of {', '.join(SCHEDULES)}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: keep the existing PNGs or replace them")
    if (cfg.resume or cfg.overwrite) and not cfg.out_dir:
        raise ValueError("--resume/--overwrite only apply to --out-dir")


def check_out_dir(cfg: SampleConfig) -> None:
    """Refuse to write into a folder that already holds PNGs unless told what to do with them."""
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir}: exists and is not a folder")
    existing = [p for p in out_dir.glob("*") if p.suffix.lower() == ".png"] if out_dir.is_dir() else []
    if existing and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out-dir {out_dir} already holds {len(existing)} PNG files; pass --resume to keep them "
                         f"and write only the missing seeds, --overwrite to replace them, or use an empty folder")


def run(cfg: SampleConfig, rank: int, world: int, device: torch.device) -> None:
    check_config(cfg)
    if cfg.out_dir:
        check_out_dir(cfg)
    log = print if rank == 0 else (lambda *a, **k: None)

    # 1. Checkpoint -> model, schedule, labels; all checks before the first network call.
    ckpt_path = Path(cfg.ckpt) if cfg.ckpt else find_latest_run("runs")
    model, ckpt = load_model(ckpt_path, cfg.weights, device)
    model_res = ckpt["model_config"].get("res")
    if cfg.res and cfg.res != model_res:
        raise ValueError(f"--res {cfg.res}: the checkpoint was trained at {model_res}x{model_res}; "
                         f"drop --res or pass a checkpoint trained at {cfg.res}")
    num_classes = getattr(model, "num_classes", 0)
    if cfg.guidance != 0 and num_classes == 0:
        raise ValueError(f"--guidance {cfg.guidance}: the checkpoint's model is unconditional, so there is "
                         f"nothing to guide; drop --guidance (or train with class labels)")
    fixed_class = resolve_class(cfg.class_label, num_classes, ckpt.get("class_names"))
    schedule = get_schedule(cfg.schedule, model_res) if cfg.schedule else Schedule(**ckpt["schedule"])
    run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    default_grid = run_dir / f"sample_{ckpt['step']:08d}{'_raw' if cfg.weights == 'raw' else ''}.png"
    grid_path = Path(cfg.out) if cfg.out else (None if cfg.out_dir else default_grid)
    log(f"sample config: {dataclasses.asdict(cfg)}")
    log(f"checkpoint: {ckpt_path} (step {ckpt['step']}, {ckpt['model_name']}, {model_res}x{model_res}), "
        f"{'EMA' if cfg.weights == 'ema' else 'raw (non-EMA)'} weights, schedule {schedule.name}"
        f"{' (trained with ' + ckpt['schedule']['name'] + ')' if cfg.schedule else ''}, "
        f"device {device}, {world} process{'es' if world > 1 else ''}")

    # 2. Seeds: seed + i for image i; rank r takes every world-th one, so each seed is made exactly once
    # for any n, batch size and number of GPUs. --resume drops seeds whose PNG exists (renamed into place,
    # so complete) -- each rank checks only its own seeds, so ranks never race on the listing.
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_images))
    mine = seeds[rank::world]
    png = (lambda s: Path(cfg.out_dir) / f"{s:06d}.png") if cfg.out_dir else None
    todo = [s for s in mine if not (cfg.resume and png(s).exists())]
    if png and rank == 0:
        for stale in Path(cfg.out_dir).glob("*.png.tmp*"):   # left by a run killed mid-write
            stale.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()  # every rank has checked the folder before anyone writes into it
    shape_chw = (ckpt["model_config"].get("in_channels", 3), model_res, model_res)

    # 3. Sample in batches; write each PNG as soon as it exists.
    kept = {}  # seed -> (H, W, C) uint8 for the grid
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    t0 = time.time()
    with tqdm(total=len(todo), unit="img", disable=rank != 0, desc=f"sampling (rank 0 of {world})") as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            labels = None
            if num_classes:
                labels = torch.tensor([fixed_class if fixed_class is not None else s % num_classes for s in batch])
            with amp:
                images = sample(model, (len(batch), *shape_chw), schedule, cfg.steps, labels, cfg.guidance,
                                cfg.guidance_interval, cfg.clip_x, batch, device=device,
                                progress=rank == 0 and sys.stderr.isatty())  # per-step bar only on a terminal
            pixels = to_uint8(images)                                        # (b, H, W, C)
            for s, p in zip(batch, pixels):
                if png:
                    save_png(p.numpy(), png(s))
                if grid_path:
                    kept[s] = p
            bar.update(len(batch))
    elapsed = time.time() - t0

    # 4. The grid: gather every rank's images on rank 0; seeds skipped by --resume are read back from disk.
    if grid_path:
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, kept)
            kept = {k: v for part in parts for k, v in part.items()}
        if rank == 0:
            for s in seeds:
                if s not in kept:
                    with Image.open(png(s)) as im:
                        kept[s] = torch.from_numpy(np.array(im)).reshape(model_res, model_res, -1)
            save_grid(torch.stack([kept[s] for s in seeds]).permute(0, 3, 1, 2), grid_path)
    if world > 1:
        dist.barrier()
    log(f"done: {len(todo)} images on rank 0 in {elapsed:.1f} s ({len(todo) / max(elapsed, 1e-9):.2f} img/s)"
        + (f", {len(mine) - len(todo)} seeds already in {cfg.out_dir} (skipped)" if len(mine) > len(todo) else ""))
    if cfg.out_dir:
        log(f"PNGs of seeds {seeds[0]}..{seeds[-1]} are in {cfg.out_dir}")
    if grid_path:
        log(f"wrote grid of {cfg.num_images} images to {grid_path}")


def main(argv=None) -> int:
    """CLI entry: bad inputs print one `error: ...` line and return 2; other failures (I/O) return 1."""
    cfg = parse_config(argv)
    rank, world, device = setup_distributed(cfg.device, timeout_minutes=30)
    try:
        run(cfg, rank, world, device)
    except (ValueError, OSError) as e:  # ValueError includes CheckpointError
        return error_exit_code(e, print_error=rank == 0 or not isinstance(e, ValueError))
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
