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
may resume under another of them. Rank 0 alone decides which file to resume from and broadcasts the path,
so every rank starts at the same step even if one of them could not read the newest file; rank 0 alone
writes.
Files are opened with `mmap=True`: a process touches only the tensors it uses (sample.py reads the EMA,
not the optimizer state), and N ranks on one node share the page cache instead of N private copies.

Choices: keep the last two checkpoints (one may be mid-write when a machine dies); a `.corrupt` suffix
for unreadable files newer than the one resumed from, so they are kept for inspection but never
overwritten; prefixes from wrapped modules are stripped on load, so a state dict saved from a DDP or
compiled wrapper by other code still loads strictly.

Run: nothing to run; `pytest tests/test_checkpoint.py` for the tests.
"""
import json
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from data import derive_seed, write_atomic
from distributed import all_reduce, broadcast_object, gather_objects, is_dist
from unet import UNet, UNetConfig
from uvit import UViT, UViTConfig

MODELS = {"unet": (UNet, UNetConfig), "uvit": (UViT, UViTConfig)}   # model_name -> (network, its config)
NAME = "ckpt_{step:08d}.pt"                                          # the file name of step `step`
PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")                           # ... and how it is recognised
REQUIRED_KEYS = ("step", "model_name", "model_config")
PREFIXES = ("_orig_mod.", "module.")                                 # torch.compile and DDP wrappers
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)      # unsharded tensors, on rank 0's CPU


class TrainingAborted(RuntimeError):
    """Training cannot go on (non-finite loss, a failed save); exit 1."""


class CheckpointError(ValueError):
    """A missing, corrupt or incompatible checkpoint, reported as one readable line (exit 2)."""


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


class BackgroundWriter:
    """save_checkpoint on a thread, so that training goes on while a multi-GB file is written: submit()
    waits for the previous write, snapshots the state (copy=True, for tensors that alias live weights as on
    a CPU; on CUDA the gathered state is already a fresh host copy) and returns; wait() blocks until the
    file is in place. The snapshot reuses host buffers from one save to the next: touching freshly
    allocated pages costs more than the copy itself. A failed write is raised by the next submit() or
    wait(), with the previous checkpoint intact."""

    def __init__(self):
        self.thread, self.error, self.buffers = None, None, []

    def snapshot(self, state: dict) -> dict:
        leaves, spec = tree_flatten(state)
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        if [(t.shape, t.dtype) for t in tensors] != [(b.shape, b.dtype) for b in self.buffers]:
            self.buffers = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
        copies = iter(self.buffers)
        return tree_unflatten([next(copies).copy_(v) if isinstance(v, torch.Tensor) else v for v in leaves], spec)

    def submit(self, run_dir, state: dict, keep: int = 2, copy: bool = True) -> None:
        self.wait()
        state = self.snapshot(state) if copy else state
        self.thread = threading.Thread(target=self._write, args=(run_dir, state, keep), daemon=False)
        self.thread.start()

    def _write(self, run_dir, state, keep) -> None:
        try:
            save_checkpoint(run_dir, state, keep)
        except BaseException as e:   # re-raised in the training thread by wait()
            self.error = e

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


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


def newest_loadable(path_or_dir, map_location="cpu") -> tuple[Path, dict]:
    """(file, its checkpoint dict): a file as given, or a folder's newest checkpoint that loads (each
    unreadable newer file is reported on stderr and skipped)."""
    path = Path(path_or_dir)
    if not path.is_dir():
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint file or run folder")
        return path, _load_one(path, map_location)
    ckpts = find_checkpoints(path)
    if not ckpts:
        raise CheckpointError(f"{path}: no checkpoints (ckpt_<step>.pt) in this folder; "
                              f"train one with `python train.py --run-dir {path}` or pass a checkpoint file")
    for p in ckpts:
        try:
            return p, _load_one(p, map_location)   # memory-mapped: the tensors are read when used
        except CheckpointError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    raise CheckpointError(f"{path}: none of the {len(ckpts)} checkpoints loads (see the warnings above)")


def load_checkpoint(path_or_dir, map_location="cpu") -> dict:
    """Load a checkpoint dict from a file, or a folder's newest loadable one. Under torchrun rank 0
    chooses the file and the other ranks load that one. An explicit file that is missing or corrupt is an
    error, because the user asked for exactly that file."""
    choice, ckpt = None, None
    if not is_dist() or dist.get_rank() == 0:
        try:
            choice, ckpt = newest_loadable(path_or_dir, map_location)
        except CheckpointError as e:
            choice = e
    choice = broadcast_object(choice)
    if isinstance(choice, CheckpointError):
        raise CheckpointError(str(choice))
    return ckpt if ckpt is not None else _load_one(choice, map_location)


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
    unknown = sorted(set(model_config) - {f.name for f in fields(config_cls)})
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
# A run folder: what to resume from, where training stands, its random streams, the log kept beside.

def config_diff(old: dict, new: dict, prefix: str = "", ignore=()) -> list[str]:
    """'name: old (checkpoint) vs new (now)' for every field that differs (lists equal tuples)."""
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return [f"{prefix}{k}: {old.get(k, '<absent>')!r} (checkpoint) vs {new.get(k, '<absent>')!r} (now)"
            for k in sorted(set(old) | set(new)) if k not in ignore and norm(old.get(k)) != norm(new.get(k))]


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
    label dropout (`noise`) and flips (`flip`), both on the device so that no draw waits on the host;
    network dropout (torch's global RNG)."""

    def __init__(self, seed: int, rank: int, device: torch.device):
        self.seed, self.rank, self.device = seed, rank, device
        self.noise, self.flip = torch.Generator(device), torch.Generator(device)
        self.reseed()

    def reseed(self, *extra) -> None:
        self.noise.manual_seed(derive_seed(self.seed, "noise", self.rank, *extra))
        self.flip.manual_seed(derive_seed(self.seed, "flip", self.rank, *extra))
        torch.manual_seed(derive_seed(self.seed, "dropout", self.rank, *extra))

    def state(self) -> dict:
        cuda = self.device.type == "cuda"
        return {"noise": self.noise.get_state().cpu(), "flip": self.flip.get_state().cpu(),
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


class Meter:
    """Loss and gradient norm of the finite steps summed on the device between log lines (no per-step host
    sync), then averaged over steps and ranks in one all-reduce; writes a log line and a log.jsonl record."""

    def __init__(self, device):
        self.sums, self.count, self.t0 = torch.zeros(3, device=device), 0, time.time()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor) -> None:
        """bad: 1.0 if the step was skipped as non-finite; it then adds nothing but the step to the clock."""
        values = torch.stack([loss.float(), grad_norm.float(), torch.ones_like(bad)])
        self.sums += torch.where(bad > 0, torch.zeros_like(values), values)   # (loss, grad, finite steps)
        self.count += 1

    def flush(self, cfg, pos: Position, lr: float, records: list, log, pbar) -> None:
        sums = all_reduce(self.sums.clone())                         # the one sync of a logging step
        loss, gnorm, finite = sums.tolist()                          # every rank saw the same finite steps
        loss, gnorm = loss / max(finite, 1), gnorm / max(finite, 1)
        if records is not None and finite:                           # rank 0 keeps the records
            r = {"step": pos.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "epoch": pos.epoch,
                 "img_per_s": round(cfg.batch_size * self.count / (time.time() - self.t0), 1),
                 "mem_gb": round(peak_memory_gb(self.sums.device), 3), "time": round(time.time(), 1)}
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


def peak_memory_gb(device: torch.device) -> float:
    """The process's peak memory so far, for training logs: the CUDA allocator's peak on a GPU, the
    resident set's peak on a CPU (everything the process holds, not only tensors)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports kB


def checkpoint_to_resume(cfg, runtime_fields=()) -> tuple[dict | None, str | None]:
    """(checkpoint, where it came from): --resume, else the run folder's newest loadable checkpoint, else
    (None, None). A checkpoint of another run, or a --resume older than files already in the folder, is
    refused before anything is written."""
    found = find_checkpoints(cfg.run_dir)
    src = cfg.resume or (cfg.run_dir if found else None)
    if src is None:
        return None, None
    ckpt = load_checkpoint(src)
    diff = config_diff(ckpt["config"], asdict(cfg), ignore=runtime_fields)
    if diff:
        raise CheckpointError(f"{src} holds a checkpoint (step {ckpt['step']}) of a different run: {'; '.join(diff)}. "
                              f"Rerun with the same flags to resume, or choose another --run-dir (nothing was "
                              f"changed or deleted)")
    newer = [p for p in found if checkpoint_step(p) > ckpt["step"]]
    if newer and cfg.resume:
        raise CheckpointError(f"{cfg.run_dir} already holds {newer[0].name}, newer than --resume {cfg.resume} "
                              f"(step {ckpt['step']}); pick another --run-dir so that nothing is overwritten")
    return ckpt, src


def resume(ckpt: dict, src: str, model, ema, optimizer, streams: RandomStreams, num_images: int,
           cfg, log) -> Position:
    """Put the live objects into the checkpoint's state; returns the position to continue from."""
    diff = config_diff(ckpt["model_config"], asdict(model.config), "model_config.", ("grad_checkpointing",))
    if diff:
        raise CheckpointError(f"{src}: the checkpoint's network differs from this run's: {'; '.join(diff)}; "
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


def prepare_run_dir(cfg, step: int, log) -> list[dict]:
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
    write_atomic(path, lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------------------------------
# Training state: what train.py saves and restores, in one place.

def training_state(*, step: int, model_name: str, model, ema, optimizer, schedule, config, class_names,
                   data_state: dict, rng_state: dict) -> dict:
    """The checkpoint dict of a training run (see the key table in the module docstring). Collective under
    torchrun: the weights and optimizer state are gathered as full (unsharded) tensors on rank 0's CPU,
    so a checkpoint has one layout whether DDP, FSDP or a single process wrote it; the other ranks get
    empty dicts. `model` and `ema` are raw modules; config dataclasses become plain dicts."""
    return {"step": step, "model_name": model_name, "model_config": asdict(model.config),
            "model": get_model_state_dict(model, options=FULL), "ema": get_model_state_dict(ema, options=FULL),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL),
            "schedule": asdict(schedule), "config": asdict(config),
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


def save_training(cfg, pos: Position, model, ema, optimizer, streams: RandomStreams, schedule,
                  class_names, num_images: int, writer: BackgroundWriter, log, wait: bool = False) -> None:
    """Collective: every rank contributes its random states; rank 0 checks the weights and hands a copy
    to the background writer (wait=True: until the file is in place). If a write fails, every rank stops
    (exit 1) at this or the next save, with the previous checkpoint intact."""
    rngs, error = gather_objects(streams.state()), None
    state = training_state(   # collective: full tensors gathered to rank 0
        step=pos.step, model_name=cfg.model, model=model, ema=ema, optimizer=optimizer, schedule=schedule,
        config=cfg, class_names=class_names,
        data_state={"epoch": pos.epoch, "batch": pos.batch, "num_images": num_images},
        rng_state={"world_size": len(rngs), "device": streams.device.type,
                   **{k: [r[k] for r in rngs] for k in rngs[0]}})
    if not is_dist() or dist.get_rank() == 0:
        try:
            bad = [k for k, v in state["model"].items() if v.is_floating_point() and not v.isfinite().all()]
            if bad:
                raise TrainingAborted(f"step {pos.step}: non-finite weights in {bad[:3]}; not saving them")
            writer.submit(cfg.run_dir, state, copy=streams.device.type == "cpu")   # raises an earlier failure
            if wait:
                writer.wait()
            log(f"{'saved' if wait else 'saving'} checkpoint of step {pos.step} in {cfg.run_dir}")
        except TrainingAborted as e:
            error = str(e)
        except OSError as e:
            error = (f"could not write the checkpoint of step {pos.step} ({e}); the previous checkpoint is "
                     f"intact; free disk space and rerun the same command to resume")
    if error := broadcast_object(error):
        raise TrainingAborted(error)
