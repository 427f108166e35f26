"""
Checkpoints: the one file format that train.py writes and sample.py (and train.py's resume) read.

The idea. A training run is only as durable as its last checkpoint, so the format is small, explicit and
safe: one `torch.save` dict of plain tensors and primitives (it loads with `weights_only=True`, which
never executes code), named `ckpt_<step>.pt` in the run folder, written atomically (temp file, fsync,
rename), the newest `keep` kept. Loading a folder means "its newest checkpoint that loads": a file
truncated by a crash is skipped with a warning, so `python train.py` run again resumes from the last
complete one. Everything a reader needs to rebuild the network is inside: the model family and its
config dataclass as a dict, the schedule, the class names. This file is the only place that knows the
name pattern, the keys, and how a model is built from them.

The keys (train.py's `training_state`):
    step            optimizer steps taken                  model_name     "unet" | "uvit"
    model_config    asdict(UNetConfig / UViTConfig)        schedule       asdict(schedules.Schedule)
    model, ema      state dicts of the raw module (no "module." or "_orig_mod." prefixes)
    optimizer       AdamW state, keyed by parameter name   config         asdict(train.TrainConfig)
    class_names     list or None                           data_state     {epoch, batch, num_images}
    rng_state       every rank's generator states, with the world size and device type that made them

Distributed runs: weights and optimizer state are saved unsharded (torch.distributed.checkpoint's
full state dicts gathered to rank 0), so one file serves a single process, DDP and FSDP alike, and a run
may resume under another of them. Rank 0 alone decides which file to resume from and broadcasts the path, so every rank
starts at the same step even if one of them could not read the newest file; rank 0 alone writes.
Files are opened with `mmap=True`: a process touches only the tensors it uses (sample.py reads the EMA,
not the optimizer state), and N ranks on one node share the page cache instead of N private copies.

Choices: keep the last two checkpoints (one may be mid-write when a machine dies); a `.corrupt` suffix
for unreadable files newer than the one resumed from, so they are kept for inspection but never
overwritten; prefixes from wrapped modules are stripped on load, so a state dict saved from a DDP or
compiled wrapper by other code still loads strictly.

Run: nothing to run; `pytest tests/test_checkpoint.py` for the tests.
"""
import dataclasses
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from data import write_atomic
from unet import UNet, UNetConfig
from uvit import UViT, UViTConfig

MODELS = {"unet": (UNet, UNetConfig), "uvit": (UViT, UViTConfig)}   # model_name -> (network, its config)
NAME = "ckpt_{step:08d}.pt"                                          # the file name of step `step`
PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")                           # ... and how it is recognised
REQUIRED_KEYS = ("step", "model_name", "model_config")
PREFIXES = ("_orig_mod.", "module.")                                 # torch.compile and DDP wrappers
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)      # unsharded tensors, on rank 0's CPU


class CheckpointError(ValueError):
    """A missing, corrupt or incompatible checkpoint, reported as one readable line (exit 2)."""


# ----------------------------------------------------------------------------------------------------
# Processes: one setup for train.py and sample.py, and the two collectives the checkpoint logic needs.

def setup_distributed(device: str = "", timeout_minutes: float = 30) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (RANK set) join the process group: NCCL on GPUs,
    gloo on CPU, with an explicit timeout, long because rank 0 alone draws sample grids and writes
    checkpoints while the others wait at the next collective. Plain `python` is rank 0 of 1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device or ("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or (f"cuda:{local_rank}" if cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_object(obj):
    """Rank 0's obj on every rank (the identity in a single process)."""
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


# ----------------------------------------------------------------------------------------------------
# Files: naming, finding, atomic saving, loading with fallback.

def checkpoint_step(path) -> int | None:
    """The step in a checkpoint's file name, or None if the name is not ours."""
    m = PATTERN.match(Path(path).name)
    return int(m.group(1)) if m else None


def find_checkpoints(run_dir) -> list[Path]:
    """The checkpoints in run_dir, newest (largest step) first; [] if none or no such folder. Temp files
    of an interrupted save (`ckpt_*.pt.tmp<pid>`) never match."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.iterdir() if checkpoint_step(p) is not None and p.is_file()] \
        if run_dir.is_dir() else []
    return sorted(found, key=checkpoint_step, reverse=True)


def save_checkpoint(run_dir, state: dict, keep: int = 2) -> Path:
    """Write state to run_dir/ckpt_<step>.pt atomically, then delete all but the newest `keep`. An OSError
    (e.g. a full disk) propagates with the previous checkpoints untouched."""
    path = write_atomic(Path(run_dir) / NAME.format(step=state["step"]), lambda f: torch.save(state, f))
    for old in find_checkpoints(run_dir)[keep:]:
        old.unlink()
    return path


def _load_one(path: Path, map_location) -> dict:
    """torch.load one file safely (weights_only, memory-mapped) and check it is one of ours. Any failure
    becomes a CheckpointError naming the file."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, not a torch file, pickled objects outside the allowlist ...
        raise CheckpointError(f"{path}: cannot read checkpoint: truncated, corrupt, or not written by train.py "
                              f"({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a simple-diffusion checkpoint (needs keys {', '.join(REQUIRED_KEYS)}; "
                              f"has {have})")
    return ckpt


def newest_loadable(path_or_dir) -> Path:
    """The file that load_checkpoint would read: a file as given, a folder's newest checkpoint that loads
    (each unreadable newer file is reported on stderr and skipped)."""
    path = Path(path_or_dir)
    if not path.is_dir():
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint file or run folder")
        return path
    ckpts = find_checkpoints(path)
    if not ckpts:
        raise CheckpointError(f"{path}: no checkpoints (ckpt_<step>.pt) in this folder; "
                              f"train one with `python train.py --run-dir {path}` or pass a checkpoint file")
    for p in ckpts:
        try:
            _load_one(p, "cpu")   # memory-mapped: reads the file's index, not its tensors
            return p
        except CheckpointError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    raise CheckpointError(f"{path}: none of the {len(ckpts)} checkpoints loads (see the warnings above)")


def load_checkpoint(path_or_dir, map_location="cpu") -> dict:
    """Load a checkpoint dict from a file, or a folder's newest loadable one. Under torchrun rank 0
    chooses the file and every rank loads that one. An explicit file that is missing or corrupt is an
    error, because the user asked for exactly that file."""
    choice = None
    if not is_dist() or dist.get_rank() == 0:
        try:
            choice = newest_loadable(path_or_dir)
        except CheckpointError as e:
            choice = e
    choice = broadcast_object(choice)
    if isinstance(choice, CheckpointError):
        raise CheckpointError(str(choice))
    return _load_one(choice, map_location)


def strip_prefixes(state_dict: dict) -> dict:
    """Remove "_orig_mod." (torch.compile) and "module." (DDP) prefixes, in any combination."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------
# Models: built from a checkpoint's model_name and model_config.

def build_model(model_name: str, model_config: dict) -> torch.nn.Module:
    """A fresh network from model_name and a model_config dict (asdict of its config dataclass). Unknown
    fields are an error (a checkpoint written by another version of the model file)."""
    if model_name not in MODELS:
        raise CheckpointError(f"unknown model_name {model_name!r} in checkpoint; known: {', '.join(MODELS)}")
    model_cls, config_cls = MODELS[model_name]
    unknown = sorted(set(model_config) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise CheckpointError(f"checkpoint model_config has fields {unknown} that {config_cls.__name__} does "
                              f"not know; was it written by another version of {model_name}.py?")
    return model_cls(config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items()}))


def load_weights(model: torch.nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict, strictly, with a one-line CheckpointError that names what did not match."""
    missing, unexpected = model.load_state_dict(strip_prefixes(state_dict), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{what} weights do not match the network built from the checkpoint's config: "
                              f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")


def load_model(path_or_dir, weights: str = "ema", device="cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on `device`, checkpoint dict) from a checkpoint file or run folder.
    weights="ema" (the default; what the paper samples from) or "raw" (the optimiser's weights)."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    ckpt = load_checkpoint(path_or_dir)
    key = "ema" if weights == "ema" else "model"
    if ckpt.get(key) is None:
        raise CheckpointError(f"checkpoint at step {ckpt['step']} has no {key!r} weights; "
                              f"use --weights {'raw' if key == 'ema' else 'ema'}")
    model = build_model(ckpt["model_name"], ckpt["model_config"])
    load_weights(model, ckpt[key], key)
    return model.to(device).eval(), ckpt


def find_latest_run(root="runs") -> Path:
    """The run folder under root (or root itself) whose newest checkpoint was written last: what
    `python sample.py` samples from when no --ckpt is given."""
    root = Path(root)
    folders = [root] + sorted(root.iterdir()) if root.is_dir() else []
    candidates = [d for d in folders if d.is_dir() and find_checkpoints(d)]
    if not candidates:
        raise CheckpointError(f"no run with checkpoints under {root}/; train one with `python train.py` "
                              f"or pass --ckpt RUN_DIR_OR_FILE")
    return max(candidates, key=lambda d: find_checkpoints(d)[0].stat().st_mtime)


# ----------------------------------------------------------------------------------------------------
# Training state: what train.py saves and restores, in one place.

def training_state(*, step: int, model_name: str, model, ema, optimizer, schedule, config, class_names,
                   data_state: dict, rng_state: dict) -> dict:
    """The checkpoint dict of a training run (see the key table in the module docstring). Collective under
    torchrun: the weights and optimizer state are gathered as full (unsharded) tensors on rank 0's CPU,
    so a checkpoint has one layout whether DDP, FSDP or a single process wrote it; the other ranks get
    empty dicts. `model` and `ema` are raw modules; config dataclasses become plain dicts."""
    return {"step": step, "model_name": model_name, "model_config": dataclasses.asdict(model.config),
            "model": get_model_state_dict(model, options=FULL), "ema": get_model_state_dict(ema, options=FULL),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL),
            "schedule": dataclasses.asdict(schedule), "config": dataclasses.asdict(config),
            "class_names": class_names, "data_state": data_state, "rng_state": rng_state}


def restore_training_state(ckpt: dict, model, ema, optimizer) -> None:
    """Load a training_state dict into the live objects, sharded or not: each rank reads the full tensors
    from its memory-mapped file and keeps its own shard. Any mismatch is one CheckpointError line."""
    try:
        for net, key in ((model, "model"), (ema, "ema")):
            set_model_state_dict(net, strip_prefixes(ckpt[key]), options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's training state does not fit this run's network and optimizer "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
