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
- AdamW with beta2 0.99 and no weight decay, fused (one kernel, which also skips a non-finite step on the
  device, so the loop never waits for the GPU); gradient clipping at 1; label dropout 0.1 (classifier-free
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
import copy
import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import losses
import memory
from checkpoint import (MODELS, BackgroundWriter, Meter, Position, RandomStreams, TrainingAborted, checkpoint_to_resume,
                        prepare_run_dir, resume, save_training)
from distributed import (LaggedFlags, StopFlag, step_flags, clip_gradients, gather_objects,
                         gradient_sync, ignore_sigint, is_dist, local, setup_distributed, shard_model, wrap_model)
from data import flag
from sample import sample
from scenes import Scenes
from schedules import SCHEDULES, get_schedule

MAX_BAD_STEPS = 5          # non-finite steps in a row before we give up
# Fields that may change when a run is resumed: they do not change what is being trained.
RUNTIME_FIELDS = ("steps", "run_dir", "resume", "compile", "precision", "num_workers", "log_every", "ckpt_every",
                  "sample_every", "sample_steps", "num_samples", "sample_guidance", "skip_bad_images", "fsdp",
                  "grad_checkpointing", "plan", "gpus", "gpu_mem", "json")


@dataclass
class TrainConfig:
    # what to train
    res: int = flag(32, "image size in pixels; with --model picks the row of TRAIN_PRESETS")
    model: str = flag("unet", "network family (unet.py or uvit.py)", choices=tuple(MODELS))
    preset: str = flag("", "model preset (PRESETS in unet.py / uvit.py); '' = chosen by --model and --res")
    data: str = flag("", "folder of images, searched recursively; '' = the built-in procedural scenes")
    num_scenes: int = flag(10000, "number of built-in scenes (ignored with --data)")
    class_cond: bool | None = flag(None, "labels: sub-folders, or the scenes' shape kind (default: scenes only)")
    label_dropout: float = flag(0.1, "probability of training on the null label (classifier-free guidance)")
    flip: bool = flag(True, "random horizontal flips")
    skip_bad_images: bool = flag(False, "skip unreadable images with a warning instead of stopping")
    num_workers: int = flag(0, "DataLoader worker processes per rank")
    # objective (losses.py, schedules.py)
    schedule: str = flag("shifted", "logSNR schedule", choices=SCHEDULES)
    noise_d: int = flag(64, "reference resolution of the shifted schedule (Sec. 3.1)")
    multiscale: bool = flag(False, "multiscale loss (Sec. 3.2)")
    weighting: str = flag("sigmoid", "the paper's eps-MSE or SiD2's sigmoid weighting", choices=("eps", "sigmoid"))
    sigmoid_bias: float | None = flag(None, "sigmoid weighting's bias b (default: losses.sid2_sigmoid_bias(res))")
    low_discrepancy: bool = flag(False, "draw the batch's t on an evenly spaced grid with one random offset (VDM)")
    # optimisation
    steps: int = flag(2000, "total optimizer steps (raise it to extend a finished run)")
    batch_size: int = flag(32, "global batch: images per optimizer step, summed over ranks and micro-steps")
    grad_accum: int = flag(1, "micro-steps (gradient accumulation) per optimizer step")
    lr: float = flag(4e-3, "peak learning rate (AdamW)")
    warmup: int = flag(100, "linear learning-rate warm-up, in steps")
    cooldown: float = flag(1 / 3, "final fraction of --steps over which the LR falls linearly to 0 (0 = none)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    beta2: float = flag(0.99, "AdamW beta2")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0 = no clipping)")
    ema_decay: float = flag(0.999, "EMA decay per step (sampling uses the EMA weights)")
    grad_checkpointing: bool = flag(False, "activation checkpointing: less memory, about a third slower")
    fsdp: bool = flag(False, "shard weights, gradients, AdamW state, EMA over the ranks (FSDP2; torchrun)")
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
    # the memory plan: print what a run needs per GPU and exit, allocating nothing (memory.py)
    plan: bool = flag(False, "print the per-GPU memory plan of this configuration and exit")
    gpus: int = flag(8, "--plan: number of GPUs (the world size)")
    gpu_mem: float = flag(80.0, "--plan: memory per GPU in GB")
    json: bool = flag(False, "--plan: print one JSON object instead of a table")


# Per (model, res): the model preset and the training numbers; explicit flags override them, and a res
# not listed uses the nearest row. All numbers are ours (the paper publishes none): the paper-scale rows
# take common large-scale practice (lr 1e-4, EMA 0.9999, batch 512, 10k warm-up steps) with the paper's
# recipe (shifted schedule, eps loss, multiscale from 256); the 32 px row is the CPU demo, whose sigmoid
# bias 3.4 was tuned on it (SiD2's rule would give 2.8 at 32 px). 500k steps x 512 is about 200 ImageNet
# epochs, a quarter of the ~800 the paper reports for its 512 model: a first run, extended exactly with a
# larger --steps (the LR stays constant) once its FID says it is worth the compute.
_PAPER = dict(batch_size=512, lr=1e-4, warmup=10000, cooldown=0.0, ema_decay=0.9999, steps=500_000,
              weighting="eps", log_every=100, ckpt_every=5000, sample_every=5000, sample_steps=256, num_workers=8)
_ROWS = {16: dict(preset="tiny"), 32: dict(preset="small", sigmoid_bias=3.4),    # 32 = the defaults
         64: dict(preset="64", **_PAPER), 128: dict(preset="128", **_PAPER),
         256: dict(preset="256", multiscale=True, **_PAPER), 512: dict(preset="512", multiscale=True, **_PAPER)}
TRAIN_PRESETS = {(model, res): row for model in MODELS for res, row in _ROWS.items()}
for _res in (64, 128, 256, 512):   # the 2B U-ViT at 64 images per GPU: 152 GB eager, 64 GB checkpointed (--plan)
    TRAIN_PRESETS[("uvit", _res)] = {**TRAIN_PRESETS[("uvit", _res)], "grad_checkpointing": True}


class ConfigError(ValueError):
    """A bad flag or an incompatible run folder, reported as one line (exit 2)."""


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


# ----------------------------------------------------------------------------------------------------
# Data: the dataset, and the order of its images (a permutation per epoch, cut into ranks' slices)

def build_dataset(cfg: TrainConfig, rank: int, world: int):
    """(dataset of (x (3, res, res) in [-1, 1], label), class names or None). A folder is checked before
    training, every file decoded, each rank its share; every rank sees all results, so all fail or go on
    together, and the verdict is cached in the run folder for the next resume."""
    if not cfg.data:
        scenes = Scenes(cfg.num_scenes, cfg.res, class_cond=cfg.class_cond)   # cached uint8 tensor
        data.check_batch(len(scenes), cfg.batch_size, f"the built-in dataset (--num-scenes {cfg.num_scenes})")
        return scenes, scenes.class_names
    summary = data.check_dataset(cfg.data, cfg.res, cfg.class_cond, cfg.skip_bad_images, min_images=cfg.batch_size,
                                 progress=rank == 0, share=(rank, world), gather=gather_objects,
                                 cache=Path(cfg.run_dir) / "data_check.json")
    folder = data.ImageFolder(cfg.data, cfg.res, cfg.class_cond, cfg.skip_bad_images, summary["bad_files"])
    return folder, folder.class_names


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


# ----------------------------------------------------------------------------------------------------
# Sample grids during training

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
    data.draw_loss_curve(records, Path(cfg.run_dir) / "loss_curve.png")
    log(f"samples: {path}")


def device_choices(cfg: TrainConfig, device: torch.device):
    """(precision, compile or not, the autocast context). bf16 autocast on GPUs: matmuls and convolutions
    in bf16, norms and the loss in fp32, weights in fp32; TF32 for what stays fp32 on Ampere and later."""
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision = ("bf16" if cuda else "fp32") if cfg.precision == "auto" else cfg.precision
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 "
                          f"support; use --precision fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    return precision, cuda if cfg.compile is None else cfg.compile, autocast


def eager_after_compile_failure(e: Exception, model, optimizer, device, log):
    """torch.compile failed on the first step: warn once, drop any partial gradients, train eagerly."""
    log(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training "
        f"without it (pass --no-compile to skip this attempt)")
    optimizer.zero_grad(set_to_none=True)
    return wrap_model(model, False, device)


def skip_step(bad_steps: int, step: int, log) -> int:
    """A non-finite step was skipped on every rank: warn; after MAX_BAD_STEPS in a row, stop (exit 1)."""
    log(f"warning: step {step}: non-finite loss or gradient; step skipped ({bad_steps} in a row)")
    if bad_steps >= MAX_BAD_STEPS:
        raise TrainingAborted(f"step {step}: loss or gradient not finite for {bad_steps} steps in a row; stopping "
                              f"without saving (the last checkpoint is intact); try a lower --lr or --precision fp32")
    return bad_steps


# ----------------------------------------------------------------------------------------------------
# main: a linear script in numbered sections

def train(argv=None):
    """The whole run; returns the raw model and the EMA (for tests and notebooks)."""
    # 1. Processes and config. A signal during start-up stops the run after its first step. -----------
    stop = StopFlag()
    cfg = resolve_config(argv)
    # --plan answers "does it fit?" before any process group, data or weights exist.
    if cfg.plan:   # memory.py: the per-GPU memory of this configuration, computed on the meta device
        check_config(cfg, cfg.gpus)
        return memory.print_plan(cfg.model, model_config(cfg, 1000 if cfg.class_cond else 0), cfg)
    rank, world, device = setup_distributed()
    check_config(cfg, world)
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    cuda = device.type == "cuda"
    precision, use_compile, autocast = device_choices(cfg, device)

    # 2. What to resume from (rank 0 chooses for all); a folder of another run is refused. -------------
    ckpt, ckpt_src = checkpoint_to_resume(cfg, RUNTIME_FIELDS)

    # 3. Data. ----------------------------------------------------------------------------------------
    # The whole dataset on every rank; the ShardSampler below gives each rank its slice of every batch.
    dataset, class_names = build_dataset(cfg, rank, world)
    # num_classes = 0 makes an unconditional network; else label num_classes is the null label.
    n, num_classes = len(dataset), len(class_names) if cfg.class_cond else 0

    # 4. Model, EMA, schedule, optimizer: the same initialisation on every rank. -----------------------
    # Same seed on every rank, so the ranks start from the same weights without a broadcast.
    torch.manual_seed(cfg.seed)
    model = MODELS[cfg.model][0](model_config(cfg, num_classes)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if cfg.fsdp:                        # shard before the optimizer is built: it must hold the shards
        shard_model(model, bf16=precision == "bf16" and cuda)
        shard_model(ema, bf16=precision == "bf16" and cuda)
    # logsnr(t) for this resolution: Eq. 5's shift 2 log(noise_d / res) by default (schedules.py).
    schedule = get_schedule(cfg.schedule, cfg.res, noise_d=cfg.noise_d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                  weight_decay=cfg.weight_decay, fused=True)   # fused: skips on device

    # 5. Resume, or start fresh; then the run folder (rank 0). ----------------------------------------
    # Resumed: the checkpoint's random streams and data position; fresh: seeded from (--seed, purpose, rank).
    streams, pos = RandomStreams(cfg.seed, rank, device), Position()
    if ckpt is not None:
        pos = resume(ckpt, ckpt_src, model, ema, optimizer, streams, n, cfg, log)
        del ckpt
    # Only rank 0 touches the run folder (config.json, log.jsonl, grids); the others only read checkpoints.
    records = prepare_run_dir(cfg, pos.step, log) if rank == 0 else None
    log("config: " + json.dumps(asdict(cfg)))
    log(f"{cfg.model} preset {cfg.preset!r}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters; {n} images; world size {world}; {device}; {precision}; run dir {cfg.run_dir}")

    # 6. The callable that trains (compiled, DDP) and the data loader from the saved position. ---------
    if use_compile and world > 1 and cfg.grad_checkpointing:
        torch._dynamo.config.optimize_ddp = False   # DDP's graph splitting rejects checkpointed regions
    # train_model is what the loop calls (compiled, under DDP); model stays the raw module it wraps.
    train_model = wrap_model(model, use_compile, device)
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=data.ShardSampler(n, cfg.batch_size, cfg.grad_accum, rank, world, cfg.seed,
                                            pos.epoch, pos.batch),
        num_workers=cfg.num_workers, pin_memory=cuda, worker_init_fn=ignore_sigint,
        persistent_workers=cfg.num_workers > 0, generator=torch.Generator()))   # not torch's global RNG

    # 7. The loop. ------------------------------------------------------------------------------------
    # theta is trained, theta_ema only averaged; both stay raw modules (no wrapper prefixes in their keys).
    model.train()
    start, last_saved, bad_steps, meter, writer = pos.step, pos.step, 0, Meter(device), BackgroundWriter()
    lagged = LaggedFlags(device)
    pbar = tqdm(total=cfg.steps, initial=pos.step, disable=rank != 0, unit="step", dynamic_ncols=True)
    while pos.step < cfg.steps:
        # lr_n: the warm-up-stable-decay schedule of the module docstring, set on AdamW every step.
        lr = lr_at(pos.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # All the step's random draws first (data, flips, t, eps, label dropout), then the network.
        micro = draw_batch(loader, streams, cfg, num_classes, device)
        try:
            loss = forward_backward(train_model, micro, schedule, cfg, autocast)
        except Exception as e:   # torch.compile fails on the first call (no compiler, unsupported op ...)
            if not use_compile or pos.step != start:
                raise
            use_compile, train_model = False, eager_after_compile_failure(e, model, optimizer, device, log)
            loss = forward_backward(train_model, micro, schedule, cfg, autocast)   # the same draws again
        # Gradients are averaged over ranks by now; clipping by the global norm scales every rank's alike.
        grad_norm = clip_gradients(model, cfg.grad_clip)
        # One tiny all-reduce agrees for all ranks, on the device: was the step non-finite anywhere, was any
        # rank signalled? The fused AdamW skips a non-finite step itself (found_inf, as GradScaler uses it).
        flags = step_flags(loss, grad_norm, stop)
        optimizer.found_inf = flags[0]
        # theta <- AdamW step (unless skipped); theta_ema <- lerp towards theta (decay warm-up first).
        optimizer.step()
        ema_update(ema, model, ema_decay_at(pos.step, cfg.ema_decay))
        meter.add(loss, grad_norm, flags[0])
        # The step is spent even when skipped: its batch is used up, so data order never depends on luck.
        optimizer.zero_grad(set_to_none=world == 1)   # under DDP the gradients are views of its buckets
        pos.advance(n // cfg.batch_size)
        pbar.update(1)
        # The host learns the previous step's flags only now (no wait): warn or give up on non-finite steps;
        # a signal stops every rank after this step, one step after it arrived.
        prev_step, bad, stopping = lagged.pop()
        lagged.push(flags, pos.step)
        bad_steps = skip_step(bad_steps + 1, prev_step, log) if bad else 0

        # Logging, checkpoints and grids happen between steps, so none of them changes what is trained.
        if pos.step % cfg.log_every == 0 or pos.step == cfg.steps or stopping:
            meter.flush(cfg, pos, lr, records, log, pbar)
        if stopping or pos.step == cfg.steps or (cfg.ckpt_every and pos.step % cfg.ckpt_every == 0):
            save_training(cfg, pos, model, ema, optimizer, streams, schedule, class_names, n, writer, log,
                 wait=stopping or pos.step == cfg.steps)
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
    if (last := lagged.pop())[1]:     # the last step's flags: a skipped step changed nothing, but say so
        log(f"warning: step {last[0]}: non-finite loss or gradient; step skipped")
    if last_saved != pos.step:
        save_training(cfg, pos, model, ema, optimizer, streams, schedule, class_names, n, writer, log, wait=True)
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
