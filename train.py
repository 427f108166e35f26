"""
Training: one script, from `python train.py` on a 2-core CPU to `torchrun` on many GPUs.

The idea. Training a diffusion model is a loop of regressions (losses.py): take a batch of images, give
each a random noise level t, noise it, ask the network for v and score it with the eps-MSE. Everything
else here is plumbing that must not change that answer. The same command runs as one process or as N
torchrun processes (each rank trains on its own shard of the data with its own noise; DDP averages the
gradients), and it survives being stopped: SIGTERM/Ctrl-C saves and exits 0, kill -9 loses at most
--ckpt-every steps, and rerunning the same command resumes. On CPU the resumed run is bit-identical to an
uninterrupted one, because data order, flips, noise, label dropout and network dropout all come from
generators whose state is in the checkpoint. Samples come from an EMA of the weights.

What simple diffusion itself asks of training (Sec. 3): the shifted schedule for the resolution (Eq. 5,
--schedule shifted, --noise-d 64), the multiscale loss from 256 up (Sec. 3.2, --multiscale), big
batches. Per optimizer step, with G = --batch-size (global) and n = step:
    lr_n      = lr * min(1, (n + 1) / warmup, (N - n) / (f N))           warm-up, constant, linear decay
    x         = G images of the epoch's permutation, split into world_size x grad_accum micro-batches
    loss      = mean over G of L_eps (or L_multi / the sigmoid weighting), labels dropped w.p. p_uncond
    theta     <- AdamW(theta, clip(grad loss, grad_clip), lr_n)       skipped if loss or grad is not finite
    theta_ema <- lerp(theta_ema, theta, 1 - beta_n),  beta_n = min(ema_decay, (1 + n) / (10 + n))

Symbols: theta -> model, theta_ema -> ema, G -> batch_size, p_uncond -> label_dropout, beta -> decay,
         N -> steps, f -> cooldown.

Choices and deviations (the paper gives no optimiser settings): AdamW (beta2 0.99, no weight decay); a
warm-up-stable-decay LR whose decay over the last third of the run visibly cleaned up the demo's shapes
(a constant LR leaves noise in the weights that the EMA does not remove in a short run); the paper-scale
rows keep a constant LR (--cooldown 0), so a finished run can be extended with a larger --steps and
resume exactly (with a cooldown, a larger --steps moves the decay); the (1 + n) / (10 + n) EMA warm-up,
so short runs have a usable EMA; gradient clipping at 1; label dropout 0.1. A skipped (non-finite) step
still counts towards --steps and uses up its batch. The defaults (no flags) are the CPU demo of
cpu-demo.md, tuned by measurement: built-in scenes, 32x32, the "small" U-Net, the shape kind as class
label (grids guided with w = 1), batch 32, lr 4e-3, 2000 steps (about 10 minutes on a slow 2-core CPU),
and SiD2's sigmoid weighting (b = 3.4), which drew visibly crisper shapes than the eps loss for the same
compute; the paper-scale rows of TRAIN_PRESETS keep the eps loss. With the LR decay, lr 4e-3 drew as many
recognisable shapes in 2250 steps as 2e-3 did in 4500 (README, "The CPU demo").

Run:  python train.py                      (the CPU demo; the same command again resumes)
      torchrun --nproc_per_node=8 train.py --res 256 --data DIR
Test: pytest tests/test_train.py
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import importlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import losses
import sample as sampling
from schedules import SCHEDULES, get_schedule

MODELS = ("unet", "uvit")  # model file = model name; imported when used (importlib), like sample.py does
MAX_BAD_STEPS = 5          # non-finite steps in a row before we give up
# Fields that may change when a run is resumed: they do not change what is being trained.
RUNTIME_FIELDS = ("steps", "run_dir", "resume", "compile", "precision", "num_workers", "log_every", "ckpt_every",
                  "sample_every", "sample_steps", "num_samples", "sample_guidance", "skip_bad_images")


def opt(default, help, **kw):
    """A dataclass field that carries its --help text (and argparse choices) for the generated CLI."""
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    # what to train
    res: int = opt(32, "image size in pixels; with --model picks the row of TRAIN_PRESETS")
    model: str = opt("unet", "network family (unet.py or uvit.py)", choices=MODELS)
    preset: str = opt("", "model preset (PRESETS in unet.py / uvit.py); '' = chosen by --model and --res")
    data: str = opt("", "folder of images, searched recursively; '' = the built-in procedural scenes")
    num_scenes: int = opt(10000, "number of built-in scenes (ignored with --data)")
    class_cond: bool | None = opt(None, "class-conditional: labels from first-level sub-folders or the scenes' "
                                        "shape kind; default: on for the built-in scenes, off with --data")
    label_dropout: float = opt(0.1, "probability of training on the null label (classifier-free guidance)")
    flip: bool = opt(True, "random horizontal flips")
    skip_bad_images: bool = opt(False, "skip unreadable images with a warning instead of stopping")
    num_workers: int = opt(0, "DataLoader worker processes per rank")
    # objective (losses.py, schedules.py)
    schedule: str = opt("shifted", "logSNR schedule", choices=SCHEDULES)
    noise_d: int = opt(64, "reference resolution of the shifted schedule (Sec. 3.1)")
    multiscale: bool = opt(False, "multiscale loss (Sec. 3.2)")
    weighting: str = opt("sigmoid", "loss weighting: the paper's eps-MSE or SiD2's sigmoid",
                         choices=("eps", "sigmoid"))
    sigmoid_bias: float = opt(3.4, "bias b of the sigmoid weighting (3.4 = 2 + 2 log(64/32): SiD2's 64 px "
                                   "value shifted like the schedule)")
    # optimisation
    steps: int = opt(2000, "total optimizer steps (raise it to extend a finished run)")
    batch_size: int = opt(32, "global batch: images per optimizer step, summed over ranks and micro-steps")
    grad_accum: int = opt(1, "micro-steps (gradient accumulation) per optimizer step")
    lr: float = opt(4e-3, "peak learning rate (AdamW)")
    warmup: int = opt(100, "linear learning-rate warm-up, in steps")
    cooldown: float = opt(1 / 3, "fraction of --steps at the end over which the LR falls linearly to 0 "
                                 "(0 = constant to the end)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    beta2: float = opt(0.99, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    ema_decay: float = opt(0.999, "EMA decay per step (sampling uses the EMA weights)")
    grad_checkpointing: bool = opt(False, "activation checkpointing: less memory, about a third slower")
    # run
    run_dir: str = opt("", "output folder; '' = runs/<model>-<res>")
    resume: str = opt("", "resume from this checkpoint file (default: the newest in the run folder)")
    seed: int = opt(0, "seed of initialisation, data order and noise")
    compile: bool | None = opt(None, "torch.compile the model (default: on for CUDA, off for CPU)")
    precision: str = opt("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "fp32", "bf16"))
    log_every: int = opt(50, "steps between log lines")
    ckpt_every: int = opt(500, "steps between checkpoints (0 = only at the end)")
    sample_every: int = opt(1000, "steps between EMA sample grids (0 = only at the end)")
    sample_steps: int = opt(64, "sampler steps for the grids")
    num_samples: int = opt(64, "images per grid (fixed seeds 0..n-1)")
    sample_guidance: float = opt(1.0, "classifier-free guidance weight w of the grids (class-conditional runs)")


# Per (model, res): the model preset and the training numbers. Explicit flags override these; a res not
# listed uses the nearest row. Paper-scale rows follow the paper where it is known (shifted schedule, eps
# loss, multiscale from 256, batch 512) and common practice elsewhere (lr 1e-4, EMA 0.9999). The 32 px row
# is the CPU demo, tuned by measurement (README): SiD2's sigmoid weighting gave crisper shapes there.
_PAPER = dict(batch_size=512, lr=1e-4, warmup=10000, cooldown=0.0, ema_decay=0.9999, steps=500_000,
              weighting="eps", log_every=100, ckpt_every=5000, sample_every=5000, sample_steps=256, num_workers=8)
_ROWS = {16: dict(preset="tiny", sigmoid_bias=4.8), 32: dict(preset="small"),   # 32 = the defaults
         64: dict(preset="64", **_PAPER), 128: dict(preset="128", **_PAPER),
         256: dict(preset="256", multiscale=True, **_PAPER), 512: dict(preset="512", multiscale=True, **_PAPER)}
TRAIN_PRESETS = {(model, res): row for model in MODELS for res, row in _ROWS.items()}


class ConfigError(ValueError):
    """A bad flag or an incompatible run folder, reported as one line (exit 2)."""


class TrainingAborted(RuntimeError):
    """Training cannot go on (non-finite loss, a failed save); exit 1."""


# ----------------------------------------------------------------------------------------------------
# Config and CLI
# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """--flag per TrainConfig field. Defaults are SUPPRESSed so parse_args returns only what the user
    typed: those override the preset row, which overrides the dataclass defaults."""
    p = argparse.ArgumentParser(description="Train a simple-diffusion model (see the docstring of train.py).",
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        row = "" if f.name in ("res", "model") else ", or the preset row"
        help_ = f"{f.metadata['help']} (default: {f.default!r}{row})"
        if f.type in (bool, bool | None):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument(flag, type=f.type, choices=f.metadata.get("choices"), help=help_)
    return p


def preset_row(model: str, res: int) -> dict:
    """The TRAIN_PRESETS row for (model, res), or the one with the nearest res (on a log scale)."""
    rows = [r for m, r in TRAIN_PRESETS if m == model]
    nearest = min(rows, key=lambda r: (abs(math.log2(r / max(res, 1))), r))
    return dict(TRAIN_PRESETS[(model, nearest)])


def resolve_config(argv=None) -> TrainConfig:
    """dataclass defaults <- preset row of (model, res) <- explicit flags."""
    explicit = vars(build_parser().parse_args(argv))
    model, res = explicit.get("model", TrainConfig.model), explicit.get("res", TrainConfig.res)
    cfg = dataclasses.replace(TrainConfig(), **{**preset_row(model, res), **explicit})
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{cfg.model}-{cfg.res}"
    if cfg.class_cond is None:   # the scenes' shape kind is a free label; a user's folder may have none
        cfg.class_cond = not cfg.data
    return cfg


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """Flag errors that need no data: fail before any compute is spent."""
    for names, low in (("res steps batch_size grad_accum lr sample_steps num_samples log_every num_scenes", 1e-30),
                       ("warmup ckpt_every sample_every num_workers weight_decay grad_clip", 0)):
        for name in names.split():
            if getattr(cfg, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be {'positive' if low else '>= 0'}, "
                                  f"got {getattr(cfg, name)}")
    if not 0 <= cfg.cooldown <= 1:
        raise ConfigError(f"--cooldown is a fraction of --steps and must lie in [0, 1], got {cfg.cooldown}")
    if not 0 <= cfg.label_dropout < 1 or not 0 <= cfg.ema_decay < 1 or not 0 < cfg.beta2 < 1:
        raise ConfigError("--label-dropout, --ema-decay and --beta2 must lie in [0, 1)")
    module = importlib.import_module(cfg.model)
    if cfg.preset not in module.PRESETS:
        raise ConfigError(f"--preset {cfg.preset!r} is not a {cfg.model} preset; choose one of "
                          f"{', '.join(module.PRESETS)}")
    with torch.device("meta"):   # the network's own checks (e.g. res vs down-sampling), no memory used
        sampling.build_model(cfg.model, asdict(module.preset_config(cfg.preset, res=cfg.res)))
    parts = world_size * cfg.grad_accum
    if cfg.batch_size % parts:
        lo, hi = cfg.batch_size // parts * parts, (cfg.batch_size // parts + 1) * parts
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by world size {world_size} x "
                          f"--grad-accum {cfg.grad_accum} = {parts}; use a multiple of {parts} "
                          f"(e.g. {hi}{f' or {lo}' if lo else ''})")
    if cfg.resume and not Path(cfg.resume).exists():
        raise ConfigError(f"--resume {cfg.resume}: no such checkpoint file or run folder")


def config_diff(old: dict, new: dict, prefix: str = "", ignore=()) -> list[str]:
    """'name: old -> new' for every field that differs (lists and tuples compare equal)."""
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return [f"{prefix}{k}: {old.get(k, '<absent>')!r} (checkpoint) vs {new.get(k, '<absent>')!r} (now)"
            for k in sorted(set(old) | set(new)) if k not in ignore and norm(old.get(k)) != norm(new.get(k))]


def derive_seed(*parts) -> int:
    """A 63-bit seed from a tuple such as (seed, "noise", rank): independent streams per purpose/rank."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------------
# Distributed helpers (all no-ops in a single process)
# ----------------------------------------------------------------------------------------------------

def setup_distributed() -> tuple[int, int, torch.device]:
    """rank, world size, device. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python does not."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # A long timeout: rank 0 alone draws the sample grids while the others wait at the next collective.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30),
                            device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    box = [obj]
    if is_dist():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    out = [obj] * (dist.get_world_size() if is_dist() else 1)
    if is_dist():
        dist.all_gather_object(out, obj)
    return out


def all_reduce(t: torch.Tensor, max_: bool = False) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if max_ else dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------------------------------
# Data order: a permutation per (seed, epoch); one global batch per step, cut into rank/micro-step slices
# ----------------------------------------------------------------------------------------------------

def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "data", epoch)))


def shard(global_batch: torch.Tensor, rank: int, world: int, accum: int) -> list[torch.Tensor]:
    """This rank's micro-batches of one global batch: slot m * world + rank of size G / (world * accum).
    The ranks' slices are disjoint and together cover the global batch exactly once."""
    size = global_batch.numel() // (world * accum)
    return [global_batch[(m * world + rank) * size:(m * world + rank + 1) * size] for m in range(accum)]


class ShardSampler:
    """Yields this rank's micro-batches of dataset indices forever, starting at a saved position
    (epoch, batch); a DataLoader batch_sampler. The last incomplete batch of an epoch is dropped."""

    def __init__(self, n, global_batch, accum, rank, world, seed, epoch=0, batch=0):
        self.n, self.g, self.accum, self.rank, self.world = n, global_batch, accum, rank, world
        self.seed, self.epoch, self.batch = seed, epoch, batch

    def __iter__(self):
        epoch, batch = self.epoch, self.batch
        while True:
            perm = epoch_permutation(self.seed, epoch, self.n)
            for b in range(batch, self.n // self.g):
                micro = shard(perm[b * self.g:(b + 1) * self.g], self.rank, self.world, self.accum)
                yield from (idx.tolist() for idx in micro)
            epoch, batch = epoch + 1, 0


def _worker_init(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's business (it saves)


# ----------------------------------------------------------------------------------------------------
# EMA, learning rate, checkpoints, pictures
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """theta_ema <- theta_ema + (1 - decay) (theta - theta_ema); buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    return min(decay, (1 + step) / (10 + step))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up, stable, decay: the smaller of the linear ramp up and the linear ramp down to 0 at --steps."""
    up = (step + 1) / cfg.warmup if cfg.warmup else 1.0
    down = (cfg.steps - step) / (cfg.cooldown * cfg.steps) if cfg.cooldown else 1.0
    return cfg.lr * min(1.0, up, down)


def save_checkpoint(run_dir: Path, state: dict, keep: int = 2) -> Path:
    """Atomic write (temp file, fsync, os.replace), then delete all but the newest `keep`. A failure
    (e.g. disk full) leaves the previous checkpoints untouched."""
    path = run_dir / f"ckpt_{state['step']:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TrainingAborted(f"{path}: could not write the checkpoint ({e}); the previous checkpoint is "
                              f"intact; free disk space and rerun the same command to resume") from e
    for old in sampling.find_checkpoints(run_dir)[keep:]:
        old.unlink()
    return path


def checkpoint_step(path: Path) -> int:
    return int(path.stem.split("_")[1])   # ckpt_00001234.pt -> 1234


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def draw_loss_curve(records: list[dict], path: Path, size=(560, 320)) -> None:
    """Loss against step on a log axis: the logged values (light) and a centred moving average of
    about 1/20 of the run (dark, no lag), with round-number ticks; drawn with Pillow."""
    from PIL import Image, ImageDraw
    pts = [(r["step"], math.log10(r["loss"])) for r in records
           if r.get("loss", 0) > 0 and math.isfinite(r["loss"])]
    if len(pts) < 2:
        return
    w, h, (l, r, t, b) = *size, (60, 15, 25, 35)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, x1 = pts[0][0], pts[-1][0]
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 - y0 < 0.1 else (y0, y1)
    sx = lambda s: l + (s - x0) / max(x1 - x0, 1) * (w - l - r)              # noqa: E731
    sy = lambda y: t + (y1 - y) / (y1 - y0) * (h - t - b)                   # noqa: E731
    d.rectangle([l, t, w - r, h - b], outline="black")
    for k in range(math.ceil(y0 * 4), math.floor(y1 * 4) + 1):              # y ticks at 10^(k/4)
        d.line([l - 4, sy(k / 4), l, sy(k / 4)], fill="black")
        d.text((4, sy(k / 4) - 6), f"{10 ** (k / 4):.3g}", fill="black")
    gap = 10 ** math.floor(math.log10(max(x1 - x0, 1) / 4))                 # x ticks at 1, 2 or 5 x 10^k
    gap *= next(m for m in (1, 2, 5, 10) if (x1 - x0) / (gap * m) <= 6)
    for k in range(math.ceil(x0 / gap), math.floor(x1 / gap) + 1):
        d.line([sx(k * gap), h - b, sx(k * gap), h - b + 4], fill="black")
        d.text((sx(k * gap) - 12, h - b + 7), f"{k * gap:g}", fill="black")
    half = len(pts) // 40
    windows = [[y for _, y in pts[max(i - half, 0):i + half + 1]] for i in range(len(pts))]
    smooth = [(s, sum(win) / len(win)) for (s, _), win in zip(pts, windows)]
    d.line([(sx(s), sy(y)) for s, y in pts], fill=(170, 190, 230), width=1)
    d.line([(sx(s), sy(y)) for s, y in smooth], fill=(20, 60, 160), width=2)
    d.text((l, 5), "training loss (log scale) vs step", fill="black")
    tmp = path.with_name(path.name + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports kB


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop agrees on it across ranks, saves at the step boundary and
    exits 0. A second Ctrl-C aborts at once (KeyboardInterrupt), without saving."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then exiting "
              f"(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# main: a linear script in numbered sections
# ----------------------------------------------------------------------------------------------------

def train(argv=None):
    """The whole run; returns the raw model and the EMA (for tests and notebooks)."""
    # 1. Distributed setup and config. -----------------------------------------------------------------
    stop = StopFlag()                   # installed first: a signal during start-up stops after step 1
    rank, world, device = setup_distributed()
    cfg = resolve_config(argv)
    check_config(cfg, world)
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # Ampere+ fp32 speed
    use_compile = cuda if cfg.compile is None else cfg.compile
    precision = ("bf16" if cuda else "fp32") if cfg.precision == "auto" else cfg.precision
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no "
                          f"bfloat16 support; use --precision fp32")
    if precision == "bf16" and not cuda:
        log("note: bf16 autocast on a CPU works but is usually slower than fp32")

    # 2. Output dir: the checkpoint to resume from; refuse one from a different run. Nothing written yet.
    run_dir = Path(cfg.run_dir)
    found = sampling.find_checkpoints(run_dir)
    ckpt_src = cfg.resume or (str(run_dir) if found else None)
    ckpt = sampling.load_checkpoint(ckpt_src) if ckpt_src else None   # a folder: newest that loads
    if ckpt is not None:
        diff = config_diff(ckpt["config"], asdict(cfg), ignore=RUNTIME_FIELDS)
        if diff:
            raise ConfigError(f"{ckpt_src} holds a checkpoint (step {ckpt['step']}) of a different run: "
                              f"{'; '.join(diff)}. Rerun with the same flags to resume, or choose another "
                              f"--run-dir (nothing was changed or deleted)")
        newer = [p for p in found if checkpoint_step(p) > ckpt["step"]]
        if newer and cfg.resume:
            raise ConfigError(f"{run_dir} already holds {newer[0].name}, newer than --resume {cfg.resume} "
                              f"(step {ckpt['step']}); pick another --run-dir so that nothing is overwritten")

    # 3. Data. ----------------------------------------------------------------------------------------
    dataset, class_names = build_dataset(cfg, rank)
    n, num_classes = len(dataset), len(class_names) if cfg.class_cond else 0

    # 4. Model and EMA: the same initialisation on every rank. -----------------------------------------
    model_config = importlib.import_module(cfg.model).preset_config(
        cfg.preset, res=cfg.res, num_classes=num_classes, grad_checkpointing=cfg.grad_checkpointing)
    torch.manual_seed(cfg.seed)
    model = sampling.build_model(cfg.model, asdict(model_config)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    schedule = get_schedule(cfg.schedule, cfg.res, noise_d=cfg.noise_d)

    # 5. Optimizer. -----------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                  weight_decay=cfg.weight_decay, **({"fused": True} if cuda else {}))

    # 6. Resume, or start fresh. Per-rank random streams, all checkpointed: t, eps and label dropout
    # (gen_noise, on the device), flips (gen_flip), network dropout (torch's global RNG). -----------------
    gen_noise = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "noise", rank))
    gen_flip = torch.Generator().manual_seed(derive_seed(cfg.seed, "flip", rank))
    torch.manual_seed(derive_seed(cfg.seed, "dropout", rank))
    step, epoch, batch_in_epoch = 0, 0, 0
    if ckpt is not None:
        diff = config_diff(ckpt["model_config"], asdict(model_config), "model_config.", ("grad_checkpointing",))
        if diff:
            raise ConfigError(f"{ckpt_src}: the checkpoint's network differs from this run's: {'; '.join(diff)}; "
                              f"choose another --run-dir")
        model.load_state_dict(sampling.strip_prefixes(ckpt["model"]))
        ema.load_state_dict(sampling.strip_prefixes(ckpt["ema"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["data_state"]["epoch"], ckpt["data_state"]["batch"]
        if ckpt["data_state"]["num_images"] != n:
            log(f"warning: the data had {ckpt['data_state']['num_images']} images and now has {n}; "
                f"continuing in epoch {epoch} with the new list")
            batch_in_epoch = min(batch_in_epoch, n // cfg.batch_size - 1)
        rng = ckpt["rng_state"]
        if (rng["world_size"], rng["device"]) == (world, device.type):
            gen_noise.set_state(rng["noise"][rank])
            gen_flip.set_state(rng["flip"][rank])
            torch.set_rng_state(rng["torch"][rank])
            if cuda:
                torch.cuda.set_rng_state(rng["cuda"][rank], device)
        else:   # another number of ranks or device type: go on, but no longer bit-exactly
            log(f"warning: checkpoint written by {rng['world_size']} {rng['device']} ranks, now {world} "
                f"{device.type}: random streams reseeded")
            gen_noise.manual_seed(derive_seed(cfg.seed, "noise", rank, step))
            gen_flip.manual_seed(derive_seed(cfg.seed, "flip", rank, step))
            torch.manual_seed(derive_seed(cfg.seed, "dropout", rank, step))
        log(f"resumed from {ckpt_src} at step {step}")
        del ckpt
    records = []   # the log so far, for the loss curve (rank 0)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for p in found:   # newer than what loaded, so unreadable: set aside (kept), not overwritten later
            if checkpoint_step(p) > step and not cfg.resume:
                p.rename(p.with_name(p.name + ".corrupt"))
                log(f"warning: {p.name} could not be loaded; kept as {p.name}.corrupt")
        for tmp in [*run_dir.glob("*.tmp*"), *run_dir.glob("samples/*.tmp*")]:   # left by a kill -9
            tmp.unlink()
        write_text_atomic(run_dir / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        log_path = run_dir / "log.jsonl"
        records = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else []
        records = [r for r in records if r["step"] <= step]   # lines written after the checkpoint go
        write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in records))
        log("config: " + json.dumps(asdict(cfg)))
        log(f"{cfg.model} preset {cfg.preset!r}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters; {n} images; world size {world}; {device}; {precision}; run dir {run_dir}")

    # 7. Compile in place, then DDP. `model` stays the raw module: saved, averaged into the EMA. --------
    if use_compile:
        try_compile(model, cfg, device, log)
    train_model = DDP(model, device_ids=[device.index] if cuda else None,
                      gradient_as_bucket_view=True) if world > 1 else model
    micro = cfg.batch_size // (world * cfg.grad_accum)
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=ShardSampler(n, cfg.batch_size, cfg.grad_accum, rank, world, cfg.seed, epoch,
                                            batch_in_epoch),
        num_workers=cfg.num_workers, pin_memory=cuda, worker_init_fn=_worker_init,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator()))   # its own generator: making the loader must not draw from torch's RNG
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def save() -> None:
        """Collective: every rank contributes its RNG states; rank 0 writes; all stop if that fails."""
        rng = {"noise": gen_noise.get_state().cpu(), "flip": gen_flip.get_state(),
               "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None}
        rngs, error = gather_objects(rng), None
        if rank == 0:
            try:
                bad = [k for k, v in model.state_dict().items()
                       if v.is_floating_point() and not v.isfinite().all()]
                if bad:
                    raise TrainingAborted(f"step {step}: non-finite weights in {bad[:3]}; not saving them")
                state = {"step": step, "model_name": cfg.model, "model_config": asdict(model_config),
                         "model": model.state_dict(), "ema": ema.state_dict(),
                         "optimizer": optimizer.state_dict(), "schedule": asdict(schedule), "config": asdict(cfg),
                         "class_names": class_names,
                         "data_state": {"epoch": epoch, "batch": batch_in_epoch, "num_images": n},
                         "rng_state": {"world_size": world, "device": device.type,
                                       **{k: [r[k] for r in rngs] for k in rng}}}
                log(f"saved {save_checkpoint(run_dir, state)}")
            except TrainingAborted as e:
                error = str(e)
        if error := broadcast_object(error):
            raise TrainingAborted(error)

    def sample_grid() -> None:
        """EMA samples from fixed seeds 0..num_samples-1 (class seed % num_classes, guided), rank 0 only."""
        if rank != 0:
            return
        labels = torch.arange(cfg.num_samples, device=device) % num_classes if num_classes else None
        with torch.random.fork_rng(devices=[device] if cuda else []):   # leave the training RNG untouched
            images = sampling.sample(ema, (cfg.num_samples, 3, cfg.res, cfg.res), schedule, cfg.sample_steps,
                                     class_labels=labels, guidance=cfg.sample_guidance if num_classes else 0.0,
                                     seeds=range(cfg.num_samples), progress=False)
        sampling.save_grid(images, run_dir / "samples" / f"step_{step:08d}.png")
        draw_loss_curve(records, run_dir / "loss_curve.png")
        log(f"samples: {run_dir / 'samples' / f'step_{step:08d}.png'}")

    # 8. The loop. ------------------------------------------------------------------------------------
    model.train()
    start_step, last_saved, bad_steps, logged = step, step, 0, 0
    loss_sum, gnorm_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    pbar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, unit="step", dynamic_ncols=True)
    t_log = time.time()
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            x, labels = next(loader)                                   # (B, 3, res, res), (B,)
            x = x.to(device, non_blocking=True)
            x = data.hflip(x, gen_flip) if cfg.flip else x             # coin flips from the CPU generator
            t = losses.sample_t(micro, device, generator=gen_noise)
            eps = torch.randn(x.shape, device=device, generator=gen_noise)
            labels = (losses.drop_labels(labels.to(device), cfg.label_dropout, num_classes, gen_noise)
                      if num_classes else None)
            # DDP all-reduces gradients during backward: skip that on all but the last micro-step.
            last = m == cfg.grad_accum - 1
            with contextlib.nullcontext() if world == 1 or last else train_model.no_sync():
                with autocast:
                    loss = losses.diffusion_loss(train_model, x, schedule, labels, multiscale=cfg.multiscale,
                                                 weighting=cfg.weighting, sigmoid_bias=cfg.sigmoid_bias,
                                                 t=t, eps=eps).mean()
                (loss / cfg.grad_accum).backward()
            step_loss += loss.detach() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        # One tiny all-reduce per step, so every rank decides alike: skip the step if any rank saw a
        # non-finite loss or gradient; stop if any rank was signalled.
        flags = torch.stack([~(step_loss.isfinite() & grad_norm.isfinite()),
                             torch.tensor(stop.requested, device=device)]).float()
        bad, stopping = all_reduce(flags, max_=True).tolist()
        if bad:
            bad_steps += 1
            log(f"warning: step {step}: non-finite loss or gradient; step skipped ({bad_steps} in a row)")
            if bad_steps >= MAX_BAD_STEPS:
                raise TrainingAborted(f"step {step}: loss or gradient not finite for {bad_steps} steps in a "
                                      f"row; stopping without saving (the last checkpoint is intact); try a "
                                      f"lower --lr or --precision fp32")
        else:
            optimizer.step()
            ema_update(ema, model, ema_decay_at(step, cfg.ema_decay))
            bad_steps, logged = 0, logged + 1
            loss_sum += step_loss
            gnorm_sum += grad_norm.float()
        optimizer.zero_grad(set_to_none=True)
        step, batch_in_epoch = step + 1, batch_in_epoch + 1
        if batch_in_epoch == n // cfg.batch_size:
            epoch, batch_in_epoch = epoch + 1, 0
        pbar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps or stopping:
            sums = all_reduce(torch.stack([loss_sum, gnorm_sum]))      # the one sync for logging
            loss_avg, gnorm_avg = (sums / (world * max(logged, 1))).tolist()
            if rank == 0 and logged:
                r = {"step": step, "loss": loss_avg, "lr": lr, "grad_norm": gnorm_avg, "epoch": epoch,
                     "img_per_s": round(cfg.batch_size * logged / (time.time() - t_log), 1),
                     "mem_gb": round(memory_gb(device), 3), "time": round(time.time(), 1)}
                records.append(r)
                with open(run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(r) + "\n")
                pbar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{r['img_per_s']:.0f}")
                log(f"step {step:>7} | loss {loss_avg:.4f} | lr {lr:.2e} | grad {gnorm_avg:.3f} | "
                    f"{r['img_per_s']:.0f} img/s | mem {r['mem_gb']:.2f} GB")
            loss_sum.zero_(), gnorm_sum.zero_()
            logged = 0
        if stopping or step == cfg.steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            save()
            last_saved = step
        if stopping:
            pbar.close()
            log(f"stopped at step {step} by a signal; run the same command again to resume")
            return model, ema
        if step == cfg.steps or (cfg.sample_every and step % cfg.sample_every == 0):
            sample_grid()
        if logged == 0:
            t_log = time.time()   # img/s counts training only, not logging, saving or sampling

    # 9. Final save (a finished run started again arrives here at once: raise --steps to go on). -------
    pbar.close()
    if last_saved != step:
        save()
    log(f"done: step {step} of {cfg.steps} ({step - start_step} trained now); checkpoints, log.jsonl, "
        f"samples/ and loss_curve.png are in {run_dir}")
    return model, ema


def try_compile(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, log) -> None:
    """Compile in place; compile errors surface on the first call, so make one forward/backward on
    dummy inputs now (RNG state preserved) and fall back to eager with a warning if it fails."""
    model.compile()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            z = torch.zeros(1, model.config.in_channels, cfg.res, cfg.res, device=device)
            model(z, torch.zeros(1, device=device)).float().mean().backward()
        model.zero_grad(set_to_none=True)
        log("torch.compile: on")
    except Exception as e:  # inductor needs a C++ compiler / Triton; many failure types
        model._compiled_call_impl = None   # undo nn.Module.compile(): back to the eager forward
        model.zero_grad(set_to_none=True)
        log(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"training without it (pass --no-compile to skip this attempt)")


def build_dataset(cfg: TrainConfig, rank: int):
    """(dataset of (image (3, res, res) in [-1, 1], label), class names or None). Folders are checked
    on rank 0 (every file decoded) and the verdict is shared, so every rank fails or goes on together."""
    if not cfg.data:
        scenes = data.Scenes(cfg.num_scenes, cfg.res, class_cond=cfg.class_cond)  # cached uint8 tensor
        data.check_batch(len(scenes), cfg.batch_size, f"the built-in dataset (--num-scenes {cfg.num_scenes})")
        return scenes, scenes.class_names
    verdict = None
    if rank == 0:
        try:
            verdict = data.check_dataset(cfg.data, cfg.res, cfg.class_cond, cfg.skip_bad_images,
                                         min_images=cfg.batch_size, progress=True)
        except data.DataError as e:
            verdict = str(e)
    verdict = broadcast_object(verdict)
    if isinstance(verdict, str):
        raise data.DataError(verdict)
    folder = data.ImageFolder(cfg.data, cfg.res, cfg.class_cond, cfg.skip_bad_images, verdict["bad_files"])
    return folder, folder.class_names


def main(argv=None):
    """CLI entry: user errors print one `error: ...` line and exit 2; aborted training exits 1."""
    try:
        return train(argv)
    except (ValueError, TrainingAborted) as e:   # ConfigError, DataError, CheckpointError, bad res ...
        if not is_dist() or dist.get_rank() == 0:
            tqdm.write(f"error: {e}", file=sys.stderr)   # on its own line even below a progress bar
        sys.exit(1 if isinstance(e, TrainingAborted) else 2)
    finally:
        if is_dist():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
