"""
Training: one script, from `python train.py` on a 2-core CPU to `torchrun` on many GPUs.

The idea. Training a diffusion model is a loop of regressions (losses.py): take a batch of clean images,
give each a random time t, noise it to z_t, ask the network for v and score it. Everything else in this
file exists so that the loop gives the same answer however it is run: as one process or N torchrun
processes (each rank trains on its own slice of every global batch with its own noise; DDP averages the
gradients), stopped and resumed (SIGTERM/Ctrl-C saves at the next step and exits 0; running the same
command again resumes, bit-identically on a CPU, because every random draw comes from a generator whose
state is checkpointed), and with gradient accumulation. Samples come from an EMA of the weights.

What simple diffusion asks of training (Sec. 3): the schedule shifted for the resolution (Eq. 5,
--schedule shifted, --noise-d 64), the multiscale loss from 256 px up (Sec. 3.2, --multiscale), large
batches. One optimizer step n, with G = --batch-size (global) and N = --steps:
    lr_n      = lr * min(1, (n + 1) / warmup, (N - n) / (f N))         warm-up, constant, linear decay
    x         = G images of the epoch's permutation, cut into world_size x grad_accum micro-batches
    loss      = mean over the G images of L_eps (or L_multi, or the sigmoid weighting), labels -> null w.p. p
    theta     <- AdamW(theta, clip(grad loss, grad_clip), lr_n)       skipped if loss or grad is not finite
    theta_ema <- lerp(theta_ema, theta, 1 - beta_n),  beta_n = min(ema_decay, (1 + n) / (10 + n))

Symbols: theta -> model, theta_ema -> ema, G -> batch_size, p -> label_dropout, beta -> decay, N -> steps,
         f -> cooldown, t -> t, eps -> eps.

Choices (the paper gives no optimiser settings; every number in TRAIN_PRESETS is ours):
- AdamW with beta2 0.99 and no weight decay; gradient clipping at 1; label dropout 0.1 (classifier-free
  guidance needs the unconditional model too).
- The EMA warm-up (1 + n) / (10 + n), so short runs already sample from a usable average.
- The LR decays linearly over the last third of the CPU demo (a constant LR leaves noise in the weights
  that a short EMA does not remove); paper-scale rows keep it constant, so a run can be extended with a
  larger --steps and still resume exactly.
- A skipped (non-finite) step still counts towards --steps and uses up its batch; five in a row stop.
- The CPU demo (no flags): built-in scenes at 32x32, the "small" U-Net, the shape kind as class label,
  batch 32, lr 4e-3, 2000 steps, SiD2's sigmoid weighting; README "The CPU demo" shows what it draws.

Run:  python train.py                      (the CPU demo; the same command again resumes)
      torchrun --nproc_per_node=8 train.py --res 256 --data DIR
Test: pytest tests/test_train.py
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import losses
from checkpoint import (MODELS, CheckpointError, broadcast_object, build_model, checkpoint_step, find_checkpoints,
                        gather_objects, is_dist, load_checkpoint, restore_training_state, save_checkpoint,
                        setup_distributed, training_state)
from data import flag
from sample import sample
from scenes import Scenes
from schedules import SCHEDULES, get_schedule

MAX_BAD_STEPS = 5          # non-finite steps in a row before we give up
# Fields that may change when a run is resumed: they do not change what is being trained.
RUNTIME_FIELDS = ("steps", "run_dir", "resume", "compile", "precision", "num_workers", "log_every", "ckpt_every",
                  "sample_every", "sample_steps", "num_samples", "sample_guidance", "skip_bad_images", "fsdp",
                  "grad_checkpointing")


@dataclass
class TrainConfig:
    # what to train
    res: int = flag(32, "image size in pixels; with --model picks the row of TRAIN_PRESETS")
    model: str = flag("unet", "network family (unet.py or uvit.py)", choices=tuple(MODELS))
    preset: str = flag("", "model preset (PRESETS in unet.py / uvit.py); '' = chosen by --model and --res")
    data: str = flag("", "folder of images, searched recursively; '' = the built-in procedural scenes")
    num_scenes: int = flag(10000, "number of built-in scenes (ignored with --data)")
    class_cond: bool | None = flag(None, "class-conditional: labels from first-level sub-folders or the scenes' "
                                         "shape kind; default: on for the built-in scenes, off with --data")
    label_dropout: float = flag(0.1, "probability of training on the null label (classifier-free guidance)")
    flip: bool = flag(True, "random horizontal flips")
    skip_bad_images: bool = flag(False, "skip unreadable images with a warning instead of stopping")
    num_workers: int = flag(0, "DataLoader worker processes per rank")
    # objective (losses.py, schedules.py)
    schedule: str = flag("shifted", "logSNR schedule", choices=SCHEDULES)
    noise_d: int = flag(64, "reference resolution of the shifted schedule (Sec. 3.1)")
    multiscale: bool = flag(False, "multiscale loss (Sec. 3.2)")
    weighting: str = flag("sigmoid", "loss weighting: the paper's eps-MSE or SiD2's sigmoid", choices=("eps", "sigmoid"))
    sigmoid_bias: float | None = flag(None, "bias b of the sigmoid weighting; default: SiD2's value for --res "
                                            "(losses.sid2_sigmoid_bias), or the preset row's")
    low_discrepancy: bool = flag(False, "draw the batch's t on an evenly spaced grid with one random offset (VDM)")
    # optimisation
    steps: int = flag(2000, "total optimizer steps (raise it to extend a finished run)")
    batch_size: int = flag(32, "global batch: images per optimizer step, summed over ranks and micro-steps")
    grad_accum: int = flag(1, "micro-steps (gradient accumulation) per optimizer step")
    lr: float = flag(4e-3, "peak learning rate (AdamW)")
    warmup: int = flag(100, "linear learning-rate warm-up, in steps")
    cooldown: float = flag(1 / 3, "fraction of --steps at the end over which the LR falls linearly to 0 "
                                  "(0 = constant to the end)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    beta2: float = flag(0.99, "AdamW beta2")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0 = no clipping)")
    ema_decay: float = flag(0.999, "EMA decay per step (sampling uses the EMA weights)")
    grad_checkpointing: bool = flag(False, "activation checkpointing: less memory, about a third slower")
    fsdp: bool = flag(False, "shard weights, gradients, optimizer state and EMA over the ranks (FSDP2) "
                             "instead of replicating them (DDP); needs torchrun")
    # run
    run_dir: str = flag("", "output folder; '' = runs/<model>-<res>")
    resume: str = flag("", "resume from this checkpoint file (default: the newest in the run folder)")
    seed: int = flag(0, "seed of initialisation, data order and noise")
    compile: bool | None = flag(None, "torch.compile the model (default: on for CUDA, off for CPU)")
    precision: str = flag("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "fp32", "bf16"))
    log_every: int = flag(50, "steps between log lines")
    ckpt_every: int = flag(500, "steps between checkpoints (0 = only at the end)")
    sample_every: int = flag(1000, "steps between EMA sample grids (0 = only at the end)")
    sample_steps: int = flag(64, "sampler steps for the grids")
    num_samples: int = flag(64, "images per grid (fixed seeds 0..n-1)")
    sample_guidance: float = flag(1.0, "classifier-free guidance weight w of the grids (class-conditional runs)")


# Per (model, res): the model preset and the training numbers; explicit flags override them, and a res
# not listed uses the nearest row. All numbers are ours (the paper publishes none): the paper-scale rows
# take common large-scale practice (lr 1e-4, EMA 0.9999, batch 512, 10k warm-up steps) with the paper's
# recipe (shifted schedule, eps loss, multiscale from 256); the 32 px row is the CPU demo, whose sigmoid
# bias 3.4 was tuned on it (SiD2's rule would give 2.8 at 32 px).
_PAPER = dict(batch_size=512, lr=1e-4, warmup=10000, cooldown=0.0, ema_decay=0.9999, steps=500_000,
              weighting="eps", log_every=100, ckpt_every=5000, sample_every=5000, sample_steps=256, num_workers=8)
_ROWS = {16: dict(preset="tiny"), 32: dict(preset="small", sigmoid_bias=3.4),    # 32 = the defaults
         64: dict(preset="64", **_PAPER), 128: dict(preset="128", **_PAPER),
         256: dict(preset="256", multiscale=True, **_PAPER), 512: dict(preset="512", multiscale=True, **_PAPER)}
TRAIN_PRESETS = {(model, res): row for model in MODELS for res, row in _ROWS.items()}


class ConfigError(ValueError):
    """A bad flag or an incompatible run folder, reported as one line (exit 2)."""


class TrainingAborted(RuntimeError):
    """Training cannot go on (non-finite loss, a failed save); exit 1."""


# ----------------------------------------------------------------------------------------------------
# Config: dataclass defaults <- the preset row of (model, res) <- the flags typed

def preset_row(model: str, res: int) -> dict:
    """The TRAIN_PRESETS row for (model, res), or the one with the nearest res (on a log scale)."""
    rows = [r for m, r in TRAIN_PRESETS if m == model]
    nearest = min(rows, key=lambda r: (abs(math.log2(r / max(res, 1))), r))
    return dict(TRAIN_PRESETS[(model, nearest)])


def resolve_config(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description="Train a simple-diffusion model (see the docstring of train.py). "
                                     "Flags override the TRAIN_PRESETS row chosen by --model and --res.")
    data.add_config_flags(parser, TrainConfig, typed_only=True)
    typed = vars(parser.parse_args(argv))
    model, res = typed.get("model", TrainConfig.model), typed.get("res", TrainConfig.res)
    cfg = dataclasses.replace(TrainConfig(), **{**preset_row(model, res), **typed})
    cfg.run_dir = cfg.run_dir or f"runs/{cfg.model}-{cfg.res}"
    if cfg.class_cond is None:   # the scenes' shape kind is a free label; a user's folder may have none
        cfg.class_cond = not cfg.data
    if cfg.sigmoid_bias is None:   # resolved here, so config.json and checkpoints record the number
        cfg.sigmoid_bias = losses.sid2_sigmoid_bias(cfg.res)
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
    with torch.device("meta"):   # the network's own checks (e.g. res vs down-sampling), no memory used
        MODELS[cfg.model][0](model_config(cfg, num_classes=0))
    parts = world_size * cfg.grad_accum
    if cfg.batch_size % parts:
        lo, hi = cfg.batch_size // parts * parts, (cfg.batch_size // parts + 1) * parts
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by world size {world_size} x "
                          f"--grad-accum {cfg.grad_accum} = {parts}; use a multiple of {parts} "
                          f"(e.g. {hi}{f' or {lo}' if lo else ''})")
    if cfg.fsdp and world_size == 1:
        raise ConfigError("--fsdp shards the model over several processes; run it under torchrun "
                          "--nproc_per_node=N with N >= 2, or drop --fsdp")
    if cfg.resume and not Path(cfg.resume).exists():
        raise ConfigError(f"--resume {cfg.resume}: no such checkpoint file or run folder")


def model_config(cfg: TrainConfig, num_classes: int):
    """The network's config dataclass: the model preset at this run's resolution and number of classes."""
    model_cls, _ = MODELS[cfg.model]
    presets = sys.modules[model_cls.__module__].PRESETS
    if cfg.preset not in presets:
        raise ConfigError(f"--preset {cfg.preset!r} is not a {cfg.model} preset; choose one of {', '.join(presets)}")
    return dataclasses.replace(presets[cfg.preset], res=cfg.res, num_classes=num_classes,
                               grad_checkpointing=cfg.grad_checkpointing)


def config_diff(old: dict, new: dict, prefix: str = "", ignore=()) -> list[str]:
    """'name: old (checkpoint) vs new (now)' for every field that differs (lists equal tuples)."""
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return [f"{prefix}{k}: {old.get(k, '<absent>')!r} (checkpoint) vs {new.get(k, '<absent>')!r} (now)"
            for k in sorted(set(old) | set(new)) if k not in ignore and norm(old.get(k)) != norm(new.get(k))]


def derive_seed(*parts) -> int:
    """A 63-bit seed from a tuple such as (seed, "noise", rank): independent streams per purpose/rank."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------------
# Data: the dataset, and the order of its images (a permutation per epoch, cut into ranks' slices)

def build_dataset(cfg: TrainConfig, rank: int):
    """(dataset of (x (3, res, res) in [-1, 1], label), class names or None). A folder is checked on rank 0
    (every file decoded) and the verdict shared, so every rank fails or goes on together."""
    if not cfg.data:
        scenes = Scenes(cfg.num_scenes, cfg.res, class_cond=cfg.class_cond)   # cached uint8 tensor
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


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "data", epoch)))


def shard(global_batch: torch.Tensor, rank: int, world: int, accum: int) -> list[torch.Tensor]:
    """This rank's micro-batches of one global batch: slot m * world + rank of size G / (world * accum).
    The ranks' slices are disjoint and together cover the global batch exactly once."""
    size = global_batch.numel() // (world * accum)
    return [global_batch[(m * world + rank) * size:(m * world + rank + 1) * size] for m in range(accum)]


class ShardSampler:
    """Yields this rank's micro-batches of dataset indices forever, from a saved position (epoch, batch);
    a DataLoader batch_sampler. The last incomplete batch of an epoch is dropped."""

    def __init__(self, n, global_batch, accum, rank, world, seed, epoch=0, batch=0):
        self.n, self.g, self.accum, self.rank, self.world = n, global_batch, accum, rank, world
        self.seed, self.epoch, self.batch = seed, epoch, batch

    def __iter__(self):
        epoch, batch = self.epoch, self.batch
        while True:
            perm = epoch_permutation(self.seed, epoch, self.n)
            for b in range(batch, self.n // self.g):
                yield from (idx.tolist() for idx in shard(perm[b * self.g:(b + 1) * self.g], self.rank,
                                                          self.world, self.accum))
            epoch, batch = epoch + 1, 0


def _worker_init(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's business (it saves)


@dataclass
class Position:
    """Where the run is: optimizer steps taken, and the data position (epoch, batch within it)."""
    step: int = 0
    epoch: int = 0
    batch: int = 0

    def advance(self, batches_per_epoch: int) -> None:
        self.step, self.batch = self.step + 1, self.batch + 1
        if self.batch == batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0


class RandomStreams:
    """Every random draw of training, per rank, from a generator whose state is checkpointed: t, eps and
    label dropout (`noise`, on the device), flips (`flip`, CPU), network dropout (torch's global RNG)."""

    def __init__(self, seed: int, rank: int, device: torch.device):
        self.seed, self.rank, self.device = seed, rank, device
        self.noise, self.flip = torch.Generator(device), torch.Generator()
        self.reseed()

    def reseed(self, *extra) -> None:
        self.noise.manual_seed(derive_seed(self.seed, "noise", self.rank, *extra))
        self.flip.manual_seed(derive_seed(self.seed, "flip", self.rank, *extra))
        torch.manual_seed(derive_seed(self.seed, "dropout", self.rank, *extra))

    def state(self) -> dict:
        cuda = self.device.type == "cuda"
        return {"noise": self.noise.get_state().cpu(), "flip": self.flip.get_state(),
                "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}

    def restore(self, saved: dict, step: int, log) -> None:
        """This rank's states from a checkpoint's rng_state; written by another number of ranks or device
        type, reseed from (seed, step) instead: the run goes on, but no longer bit-exactly."""
        world = dist.get_world_size() if is_dist() else 1
        if (saved["world_size"], saved["device"]) != (world, self.device.type):
            log(f"warning: checkpoint written by {saved['world_size']} {saved['device']} ranks, now {world} "
                f"{self.device.type}: random streams reseeded")
            return self.reseed(step)
        self.noise.set_state(saved["noise"][self.rank])
        self.flip.set_state(saved["flip"][self.rank])
        torch.set_rng_state(saved["torch"][self.rank])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda"][self.rank], self.device)


# ----------------------------------------------------------------------------------------------------
# One optimizer step, EMA, learning rate

def draw_batch(loader, streams: RandomStreams, cfg: TrainConfig, num_classes: int, device) -> list[tuple]:
    """This rank's micro-batches of one step with all their random draws: (x, labels, t, eps) each."""
    micro = []
    for _ in range(cfg.grad_accum):
        x, labels = next(loader)                                             # (B, 3, res, res), (B,)
        x = x.to(device, non_blocking=True)
        x = data.hflip(x, streams.flip) if cfg.flip else x
        t = losses.sample_t(x.shape[0], device, cfg.low_discrepancy, generator=streams.noise)   # (B,)
        eps = torch.randn(x.shape, device=device, generator=streams.noise)                      # (B, 3, res, res)
        labels = (losses.drop_labels(labels.to(device, non_blocking=True), cfg.label_dropout, num_classes,
                                     streams.noise) if num_classes else None)
        micro.append((x, labels, t, eps))
    return micro


def forward_backward(train_model, micro: list[tuple], schedule, cfg: TrainConfig, autocast) -> torch.Tensor:
    """Accumulate the gradient of the step's mean loss over its micro-batches; returns the loss (on the
    device). The ranks' gradients are averaged only with the last micro-batch's backward."""
    step_loss = torch.zeros((), device=micro[0][0].device)
    for m, (x, labels, t, eps) in enumerate(micro):
        last = m == len(micro) - 1
        with gradient_sync(train_model, last):
            with autocast:
                loss = losses.diffusion_loss(train_model, x, schedule, labels, multiscale=cfg.multiscale,
                                             weighting=cfg.weighting, sigmoid_bias=cfg.sigmoid_bias,
                                             t=t, eps=eps).mean()
            (loss / len(micro)).backward()
        step_loss += loss.detach() / len(micro)
    return step_loss


def gradient_sync(train_model, last: bool):
    """DDP: skip the all-reduce (no_sync) on all but the last micro-batch; FSDP: the same switch, set on
    the module; one process: nothing to do."""
    if isinstance(train_model, DDP):
        return contextlib.nullcontext() if last else train_model.no_sync()
    module = getattr(train_model, "_orig_mod", train_model)      # under torch.compile's wrapper
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def local(tensors) -> list[torch.Tensor]:
    """This rank's part of each tensor: the local shard of an FSDP DTensor, else the tensor itself."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """theta_ema <- theta_ema + (1 - decay) (theta - theta_ema), all tensors in one fused call, shard by
    shard under FSDP (the EMA is sharded like the model); buffers (none in our networks) are copied."""
    torch._foreach_lerp_(local(ema.parameters()), local(model.parameters()), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    return min(decay, (1 + step) / (10 + step))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up, stable, decay: the smaller of the linear ramp up and the linear ramp down to 0 at --steps."""
    up = (step + 1) / cfg.warmup if cfg.warmup else 1.0
    down = (cfg.steps - step) / (cfg.cooldown * cfg.steps) if cfg.cooldown else 1.0
    return cfg.lr * min(1.0, up, down)


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------------------------------
# The run folder: resuming, checkpoints, sample grids, the log

def checkpoint_to_resume(cfg: TrainConfig) -> tuple[dict | None, str | None]:
    """(checkpoint, where it came from): --resume, else the run folder's newest loadable checkpoint, else
    (None, None). A checkpoint of another run, or a --resume older than files already in the folder, is
    refused before anything is written."""
    found = find_checkpoints(cfg.run_dir)
    src = cfg.resume or (cfg.run_dir if found else None)
    if src is None:
        return None, None
    ckpt = load_checkpoint(src)
    diff = config_diff(ckpt["config"], asdict(cfg), ignore=RUNTIME_FIELDS)
    if diff:
        raise ConfigError(f"{src} holds a checkpoint (step {ckpt['step']}) of a different run: {'; '.join(diff)}. "
                          f"Rerun with the same flags to resume, or choose another --run-dir (nothing was "
                          f"changed or deleted)")
    newer = [p for p in found if checkpoint_step(p) > ckpt["step"]]
    if newer and cfg.resume:
        raise ConfigError(f"{cfg.run_dir} already holds {newer[0].name}, newer than --resume {cfg.resume} "
                          f"(step {ckpt['step']}); pick another --run-dir so that nothing is overwritten")
    return ckpt, src


def resume(ckpt: dict, src: str, model, ema, optimizer, streams: RandomStreams, num_images: int,
           cfg: TrainConfig, log) -> Position:
    """Put the live objects into the checkpoint's state; returns the position to continue from."""
    diff = config_diff(ckpt["model_config"], asdict(model.config), "model_config.", ("grad_checkpointing",))
    if diff:
        raise ConfigError(f"{src}: the checkpoint's network differs from this run's: {'; '.join(diff)}; "
                          f"choose another --run-dir")
    restore_training_state(ckpt, model, ema, optimizer)
    saved = ckpt["data_state"]
    pos = Position(ckpt["step"], saved["epoch"], saved["batch"])
    if saved["num_images"] != num_images:
        log(f"warning: the data had {saved['num_images']} images and now has {num_images}; continuing in "
            f"epoch {pos.epoch} with the new list")
        pos.batch = min(pos.batch, num_images // cfg.batch_size - 1)
    streams.restore(ckpt["rng_state"], pos.step, log)
    log(f"resumed from {src} at step {pos.step}")
    return pos


def prepare_run_dir(cfg: TrainConfig, step: int, log) -> list[dict]:
    """Rank 0, before training: set aside unreadable checkpoints newer than `step` (kept as .corrupt, never
    overwritten), remove temp files of a killed save, write config.json, and cut log.jsonl back to `step`.
    Returns the log records so far (for the loss curve)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for p in find_checkpoints(run_dir):
        if checkpoint_step(p) > step and not cfg.resume:
            p.rename(p.with_name(p.name + ".corrupt"))
            log(f"warning: {p.name} could not be loaded; kept as {p.name}.corrupt")
    for tmp in [*run_dir.glob("*.tmp*"), *run_dir.glob("samples/*.tmp*")]:
        tmp.unlink()
    write_text(run_dir / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    log_path = run_dir / "log.jsonl"
    records = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else []
    records = [r for r in records if r["step"] <= step]          # lines written after the checkpoint go
    write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def write_text(path: Path, text: str) -> None:
    data.write_atomic(path, lambda f: f.write(text.encode()))


def save(cfg: TrainConfig, pos: Position, model, ema, optimizer, streams: RandomStreams, schedule,
         class_names, num_images: int, log) -> None:
    """Collective: every rank contributes its random states; rank 0 checks the weights and writes; if
    that fails, every rank stops (exit 1) with the previous checkpoint intact."""
    rngs, error = gather_objects(streams.state()), None
    state = training_state(   # collective: full tensors gathered to rank 0
        step=pos.step, model_name=cfg.model, model=model, ema=ema, optimizer=optimizer, schedule=schedule,
        config=cfg, class_names=class_names, data_state={"epoch": pos.epoch, "batch": pos.batch, "num_images":
                                                         num_images},
        rng_state={"world_size": len(rngs), "device": streams.device.type, **{k: [r[k] for r in rngs] for k in rngs[0]}})
    if not is_dist() or dist.get_rank() == 0:
        try:
            bad = [k for k, v in state["model"].items() if v.is_floating_point() and not v.isfinite().all()]
            if bad:
                raise TrainingAborted(f"step {pos.step}: non-finite weights in {bad[:3]}; not saving them")
            log(f"saved {save_checkpoint(cfg.run_dir, state)}")
        except TrainingAborted as e:
            error = str(e)
        except OSError as e:
            error = (f"could not write the checkpoint of step {pos.step} ({e}); the previous checkpoint is "
                     f"intact; free disk space and rerun the same command to resume")
    if error := broadcast_object(error):
        raise TrainingAborted(error)


def sample_grid(cfg: TrainConfig, step: int, ema, schedule, num_classes: int, autocast, records, log) -> None:
    """EMA samples from the fixed seeds 0..num_samples-1 (class seed % num_classes, guided), and the loss
    curve so far, written by rank 0. A sharded EMA needs every rank in its forward passes, so under FSDP all
    ranks sample (the same images); else rank 0 alone. Training's random streams are left untouched."""
    rank = dist.get_rank() if is_dist() else 0
    if rank != 0 and not cfg.fsdp:
        return
    device = next(ema.parameters()).device
    labels = torch.arange(cfg.num_samples, device=device) % num_classes if num_classes else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
        images = sample(ema, (cfg.num_samples, 3, cfg.res, cfg.res), schedule, cfg.sample_steps,
                        class_labels=labels, guidance=cfg.sample_guidance if num_classes else 0.0,
                        seeds=range(cfg.num_samples), progress=False)
    path = Path(cfg.run_dir) / "samples" / f"step_{step:08d}.png"
    if rank != 0:
        return
    data.save_grid(images, path)
    draw_loss_curve(records, Path(cfg.run_dir) / "loss_curve.png")
    log(f"samples: {path}")


class Meter:
    """Loss and gradient norm summed on the device between log lines (no per-step host sync), then
    averaged over steps and ranks in one all-reduce; writes a log line and a log.jsonl record."""

    def __init__(self, device):
        self.sums, self.count, self.t0 = torch.zeros(2, device=device), 0, time.time()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.sums += torch.stack([loss, grad_norm.float()])
        self.count += 1

    def flush(self, cfg: TrainConfig, pos: Position, lr: float, records: list, log, pbar) -> None:
        sums = all_reduce(self.sums.clone())                         # the one sync of a logging step
        world = dist.get_world_size() if is_dist() else 1
        loss, gnorm = (sums / (world * max(self.count, 1))).tolist()
        if records is not None and self.count:                       # rank 0 keeps the records
            r = {"step": pos.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "epoch": pos.epoch,
                 "img_per_s": round(cfg.batch_size * self.count / (time.time() - self.t0), 1),
                 "mem_gb": round(memory_gb(self.sums.device), 3), "time": round(time.time(), 1)}
            records.append(r)
            with open(Path(cfg.run_dir) / "log.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            pbar.set_postfix(loss=f"{loss:.4f}", img_s=f"{r['img_per_s']:.0f}")
            log(f"step {pos.step:>7} | loss {loss:.4f} | lr {lr:.2e} | grad {gnorm:.3f} | "
                f"{r['img_per_s']:.0f} img/s | mem {r['mem_gb']:.2f} GB")
        self.sums.zero_()
        self.count = 0

    def restart_clock(self) -> None:
        """img/s counts training only, not logging, saving or sampling."""
        self.t0 = time.time()


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports kB


def draw_loss_curve(records: list[dict], path: Path, size=(560, 320)) -> None:
    """Loss against step on a log axis: the logged values (light) and a centred moving average of
    about 1/20 of the run (dark, no lag), with round-number ticks; drawn with Pillow."""
    from PIL import Image, ImageDraw
    pts = [(r["step"], math.log10(r["loss"])) for r in records if r.get("loss", 0) > 0 and math.isfinite(r["loss"])]
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
    data.write_atomic(path, lambda f: img.save(f, format="PNG"))


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


def shard_model(model: torch.nn.Module, bf16: bool) -> None:
    """FSDP2 in place: each conv level, U-Net middle block and transformer block is one unit whose
    weights are gathered just before it runs and freed after; the root holds the rest (stem, embeddings,
    head). On CUDA the gathered weights are bf16, gradients are reduced in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for unit in [*model.levels, *getattr(model, "middle", ()), *getattr(model, "blocks", ())]:
        fully_shard(unit, mp_policy=policy)
    for level in model.levels:              # a level runs through encode/decode, not forward
        register_fsdp_forward_method(level, "encode")
        register_fsdp_forward_method(level, "decode")
    fully_shard(model, mp_policy=policy)


def wrap_model(model, use_compile: bool, device: torch.device):
    """The callable that trains: torch.compile's wrapper of the raw module (if asked), inside DDP when
    there are several ranks (an FSDP-sharded module needs no wrapper). The raw module stays what is saved
    and averaged, so keys carry no prefixes."""
    net = torch.compile(model) if use_compile else model
    if not is_dist() or isinstance(model, FSDPModule):
        return net
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


def agree_on_step(loss: torch.Tensor, grad_norm: torch.Tensor, stop: StopFlag) -> tuple[bool, bool]:
    """(skip this step, stop after it), decided alike on every rank with one tiny all-reduce: skip if any
    rank saw a non-finite loss or gradient, stop if any rank was signalled."""
    flags = torch.stack([~(loss.isfinite() & grad_norm.isfinite()), torch.tensor(stop.requested, device=loss.device)])
    bad, stopping = all_reduce(flags.float(), dist.ReduceOp.MAX if is_dist() else None).tolist()
    return bool(bad), bool(stopping)


# ----------------------------------------------------------------------------------------------------
# main: a linear script in numbered sections

def train(argv=None):
    """The whole run; returns the raw model and the EMA (for tests and notebooks)."""
    # 1. Processes and config. A signal during start-up stops the run after its first step. -----------
    stop = StopFlag()
    rank, world, device = setup_distributed()
    cfg = resolve_config(argv)
    check_config(cfg, world)
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # Ampere+ fp32 speed
    use_compile = cuda if cfg.compile is None else cfg.compile
    precision = ("bf16" if cuda else "fp32") if cfg.precision == "auto" else cfg.precision
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 "
                          f"support; use --precision fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    # 2. What to resume from (rank 0 chooses for all); a folder of another run is refused. -------------
    ckpt, ckpt_src = checkpoint_to_resume(cfg)

    # 3. Data. ----------------------------------------------------------------------------------------
    dataset, class_names = build_dataset(cfg, rank)
    n, num_classes = len(dataset), len(class_names) if cfg.class_cond else 0

    # 4. Model, EMA, schedule, optimizer: the same initialisation on every rank. -----------------------
    torch.manual_seed(cfg.seed)
    model = MODELS[cfg.model][0](model_config(cfg, num_classes)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if cfg.fsdp:                        # shard before the optimizer is built: it must hold the shards
        shard_model(model, bf16=precision == "bf16" and cuda)
        shard_model(ema, bf16=precision == "bf16" and cuda)
    schedule = get_schedule(cfg.schedule, cfg.res, noise_d=cfg.noise_d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                  weight_decay=cfg.weight_decay, **({"fused": True} if cuda else {}))

    # 5. Resume, or start fresh; then the run folder (rank 0). ----------------------------------------
    streams, pos = RandomStreams(cfg.seed, rank, device), Position()
    if ckpt is not None:
        pos = resume(ckpt, ckpt_src, model, ema, optimizer, streams, n, cfg, log)
        del ckpt
    records = prepare_run_dir(cfg, pos.step, log) if rank == 0 else None
    log("config: " + json.dumps(asdict(cfg)))
    log(f"{cfg.model} preset {cfg.preset!r}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters; {n} images; world size {world}; {device}; {precision}; run dir {cfg.run_dir}")

    # 6. The callable that trains (compiled, DDP) and the data loader from the saved position. ---------
    if use_compile and world > 1 and cfg.grad_checkpointing:
        torch._dynamo.config.optimize_ddp = False   # DDP's graph splitting rejects checkpointed regions
    train_model = wrap_model(model, use_compile, device)
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=ShardSampler(n, cfg.batch_size, cfg.grad_accum, rank, world, cfg.seed,
                                            pos.epoch, pos.batch),
        num_workers=cfg.num_workers, pin_memory=cuda, worker_init_fn=_worker_init,
        persistent_workers=cfg.num_workers > 0, generator=torch.Generator()))   # not torch's global RNG

    # 7. The loop. ------------------------------------------------------------------------------------
    model.train()
    start, last_saved, bad_steps, meter = pos.step, pos.step, 0, Meter(device)
    pbar = tqdm(total=cfg.steps, initial=pos.step, disable=rank != 0, unit="step", dynamic_ncols=True)
    while pos.step < cfg.steps:
        lr = lr_at(pos.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = draw_batch(loader, streams, cfg, num_classes, device)
        try:
            loss = forward_backward(train_model, micro, schedule, cfg, autocast)
        except Exception as e:   # torch.compile fails on the first call (no compiler, unsupported op ...)
            if not use_compile or pos.step != start:
                raise
            log(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training "
                f"without it (pass --no-compile to skip this attempt)")
            use_compile, train_model = False, wrap_model(model, False, device)
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(train_model, micro, schedule, cfg, autocast)   # the same draws again
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm   # FSDP: a DTensor
        bad, stopping = agree_on_step(loss, grad_norm, stop)
        if bad:
            bad_steps += 1
            log(f"warning: step {pos.step}: non-finite loss or gradient; step skipped ({bad_steps} in a row)")
            if bad_steps >= MAX_BAD_STEPS:
                raise TrainingAborted(f"step {pos.step}: loss or gradient not finite for {bad_steps} steps in a "
                                      f"row; stopping without saving (the last checkpoint is intact); try a "
                                      f"lower --lr or --precision fp32")
        else:
            optimizer.step()
            ema_update(ema, model, ema_decay_at(pos.step, cfg.ema_decay))
            bad_steps = 0
            meter.add(loss, grad_norm)
        optimizer.zero_grad(set_to_none=world == 1)   # under DDP the gradients are views of its buckets
        pos.advance(n // cfg.batch_size)
        pbar.update(1)

        if pos.step % cfg.log_every == 0 or pos.step == cfg.steps or stopping:
            meter.flush(cfg, pos, lr, records, log, pbar)
        if stopping or pos.step == cfg.steps or (cfg.ckpt_every and pos.step % cfg.ckpt_every == 0):
            save(cfg, pos, model, ema, optimizer, streams, schedule, class_names, n, log)
            last_saved = pos.step
        if stopping:
            pbar.close()
            log(f"stopped at step {pos.step} by a signal; run the same command again to resume")
            return model, ema
        if pos.step == cfg.steps or (cfg.sample_every and pos.step % cfg.sample_every == 0):
            sample_grid(cfg, pos.step, ema, schedule, num_classes, autocast, records, log)
        if meter.count == 0:
            meter.restart_clock()

    # 8. Final save (a finished run started again arrives here at once: raise --steps to go on). -------
    pbar.close()
    if last_saved != pos.step:
        save(cfg, pos, model, ema, optimizer, streams, schedule, class_names, n, log)
    log(f"done: step {pos.step} of {cfg.steps} ({pos.step - start} trained now); checkpoints, log.jsonl, "
        f"samples/ and loss_curve.png are in {cfg.run_dir}")
    return model, ema


def main(argv=None):
    """CLI entry: bad inputs print one `error: ...` line and exit 2; aborted training exits 1."""
    try:
        return train(argv)
    except (ValueError, TrainingAborted) as e:   # ConfigError, DataError, CheckpointError, bad res ...
        sys.exit(data.error_exit_code(e, print_error=not is_dist() or dist.get_rank() == 0))
    finally:
        if is_dist():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
