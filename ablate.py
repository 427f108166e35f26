"""
Ablations: does each idea of simple diffusion help on our scenes? One command per study, every arm trained
the same way but for one factor, then scored against real scenes.

The idea. A claim such as "shift the schedule for the resolution" is tested by training two or more
networks that differ only in that choice (same seed, data, steps, optimiser, network) and comparing their
samples. Each arm is a train.py run (called in-process); its EMA weights draw N images from the fixed
seeds 0..N-1 (the class asked for is seed % 3, so every arm is asked for the same pictures), and we report:
  - FID@N against N real scenes drawn from a scene seed training never saw (REFERENCE_SEED), features from
    the FID Inception (fid.py). FID is biased upward at small N: compare rows of one study, never with
    published FID-50k numbers.
  - KID (the unbiased cubic-kernel MMD^2, mean +- std over random subsets): unbiased at any N.
  - the shape score (scenes.py): how often a small CNN names the shape kind that was asked for.
  - a denoising check that needs no sampler: the x_pred error of the EMA network on held-out scenes at a few
    fixed log-SNRs, divided by that of the best LINEAR denoiser of the scenes (the Fourier Wiener filter of
    a stationary Gaussian with the training scenes' mean and power spectrum,
    x_hat = mean + F^-1[alpha P / (alpha^2 P + sigma^2) F(z_t - alpha mean)]). Below 1 the network knows
    more than the images' spectrum; above 1 at low log-SNR it has not yet learnt the global structure that
    the first sampler steps decide, whatever the schedule. Log-SNRs, not times t: arms with different
    schedules are asked the same questions.

Studies, and the claims they test:
  schedule    Sec. 3.1: the cosine logSNR schedule shifted by 2 log(64/d) beats the plain cosine schedule
              at high resolution; the interpolated schedule (Eq. 6) as the third arm. Loss: eps (the paper's).
  loss        Sec. 3.2: the multiscale loss vs the plain eps loss; SiD2's sigmoid weighting as the third
              arm. Schedule: shifted.
  schedule-sigmoid  the schedule study under SiD2's sigmoid weighting: does the schedule matter once the
              loss makes the network learn the low-SNR levels? (Its shifted arm is the loss study's sigmoid.)
  resolution  Sec. 3.1's premise: with the shifted schedule the same recipe works at 32, 64 and 128 px
              (FIDs at different resolutions are each against real scenes at that resolution).
  demo        no claim: the CPU demo, `python train.py` with its defaults (SiD2's sigmoid loss), scored.

Symbols: N -> num_samples (images per arm, and real images), d -> res, w -> guidance, m -> KID subset size,
P -> power (the scenes' power spectrum), F -> torch.fft.fft2 (orthonormal).

Choices:
- Defaults are CPU-sized, not paper-sized: batch 32, lr 4e-3, 2000 steps (the CPU demo's recipe), 64
  sampler steps without guidance (w = 0: the table scores the trained model itself, and guidance would
  double the sampling time), N = 256, and the U-Net of SCENE_PRESETS at each resolution (unet.py: the
  demo's "small" at 32 px; at 64 and 128 px the same x2 wavelet stem with one more, narrower level).
  Every number is a flag; all arms share them.
- "Training minutes here" is the wall time of train.py on this machine (start-up and its final 16-image
  grid included), summed over resumed parts; a shared machine inflates it.
- Real reference scenes use REFERENCE_SEED = 2 (training uses scene seed 0, the shape classifier seed 1).
- KID uses subsets of --kid-subset-size (1000, the torch-fidelity convention); with fewer images fid.py
  warns and uses all of them, so every subset is the whole set and the std is 0 (the table says so).
- Without --fid-weights the Inception is randomly initialised (seed 0): the pipeline runs, but the numbers
  are NOT FID (a loud warning, and a note in every results file). Only for tests and dry runs.
- Resume: an arm lives in <out>/runs/<study>/<arm>-seed<k>; an arm whose metrics.json exists is skipped,
  train.py resumes a half-trained one, its samples.npz is reused if scoring was cut short, results are
  rewritten after every arm, and a failed arm is recorded as failed while the others go on (rerunning
  retries it); one ablate.py per study and folder (runs/<study>.lock). --arms and --seeds may change
  between runs (rows accumulate); any other changed flag is refused, naming the fields, before anything
  is written.
- An arm that another study in the same --out has already finished with identical training, sampling and
  scoring (the loss study's eps arm is the schedule study's shifted arm) is copied, not retrained: its
  row says which run it is.

Run:  python ablate.py schedule --fid-weights pt_inception-2015-12-05-6726825d.pth
Test: pytest tests/test_ablate.py
"""
import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
import fid
import train
from checkpoint import load_model
from data import flag
from inception import InceptionV3, load_inception
from losses import diffuse, x_from_v
from sample import sample
from scenes import KINDS, Scenes, shape_classifier, shape_score
from schedules import Schedule, alpha_sigma

REFERENCE_SEED = 2        # scene seed of the real reference images (0: training data, 1: the shape classifier)
ROW_IMAGES = 8            # images per arm in the PNG
DENOISE_LOGSNRS = (2.0, -1.0, -4.0)   # the denoising check: fine detail, mid-size, global structure
DENOISE_IMAGES = 64                   # held-out scenes it denoises (and 512 training scenes give the spectrum)
SCHEDULE_ARMS = {name: dict(schedule=name) for name in ("cosine", "shifted", "interpolated")}  # both schedule studies
# Per study: the default resolution, what all arms share, and what each arm sets (train.py flag values).
STUDIES = {
    "schedule": dict(res=128, fixed=dict(weighting="eps", multiscale=False), arms=SCHEDULE_ARMS),
    "loss": dict(res=128, fixed=dict(schedule="shifted"),
                 arms={"eps": dict(weighting="eps", multiscale=False),
                       "multiscale": dict(weighting="eps", multiscale=True),
                       "sigmoid": dict(weighting="sigmoid", multiscale=False)}),
    "schedule-sigmoid": dict(res=128, fixed=dict(weighting="sigmoid", multiscale=False), arms=SCHEDULE_ARMS),
    "resolution": dict(res=None, fixed=dict(schedule="shifted", weighting="eps", multiscale=False),
                       arms={"32": dict(res=32), "64": dict(res=64), "128": dict(res=128)}),
    "demo": dict(res=32, fixed={}, arms={"default": {}}),      # `python train.py` as it is, scored
}
# The CPU-scale U-Net per resolution (unet.py): the demo's "small" at 32 px; at 64 and 128 px the same x2
# wavelet stem with one more, narrower level (small64 / small128).
SCENE_PRESETS = {16: "tiny", 32: "small", 64: "small64", 128: "small128"}
# Flags that may change between runs of one study without changing what a finished row means.
RUNTIME_FIELDS = ("arms", "seeds", "out", "sample_batch", "fid_weights", "shape_cache")


@dataclass
class AblateConfig:
    res: int = flag(0, "image size; 0 = the study's default (128; the resolution study's arms set their own)")
    arms: str = flag("", "arms to run (default: all of the study's)", nargs="*")
    seeds: str = flag("0", "training seeds; every arm is trained once per seed", nargs="+")
    steps: int = flag(2000, "training steps per arm")
    preset: str = flag("", "U-Net preset (unet.py PRESETS) of every arm; '' = SCENE_PRESETS at the arm's res")
    batch_size: int = flag(32, "training batch")
    lr: float = flag(4e-3, "peak learning rate")
    num_scenes: int = flag(10000, "training scenes")
    num_samples: int = flag(256, "N: samples per arm, and real reference scenes (FID@N)")
    sample_steps: int = flag(64, "sampler steps")
    guidance: float = flag(0.0, "classifier-free guidance weight w of the samples (0 = none)")
    sample_batch: int = flag(32, "images per sampler batch (memory only: samples do not depend on it)")
    kid_subset_size: int = flag(1000, "KID subset size m (fewer images: all of them, with a note)")
    kid_subsets: int = flag(100, "KID subsets")
    fid_weights: str = flag("", "FID Inception weights file; '' = RANDOM weights (numbers are then not FID)")
    shape_score: bool = flag(True, "score samples with the shape classifier (trained once, ~1 min, cached)")
    shape_cache: str = flag("", "folder of the cached shape classifier ('' = scenes.default_cache_dir())")
    out: str = flag("results", "folder of the results files and of runs/<study>/<arm>-seed<k>")


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)   # below the progress bars, like train.py's log lines


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: train.py saved at a step boundary; the study stops, rerunning resumes."""


# ----------------------------------------------------------------------------------------------------
# Config: the study, its arms and seeds, checked before any compute

def parse(argv=None) -> tuple[str, AblateConfig]:
    studies = "; ".join(f"{s}: {', '.join(v['arms'])}" for s, v in STUDIES.items())
    p = argparse.ArgumentParser(description=f"Train, sample and score every arm of a study (see the docstring "
                                f"of ablate.py). Studies and their arms: {studies}.")
    p.add_argument("study", help=f"one of: {', '.join(STUDIES)}")
    data.add_config_flags(p, AblateConfig)
    args = vars(p.parse_args(argv))
    study = args.pop("study")
    return study, data.config_from_args(AblateConfig, args)


def as_list(value) -> list[str]:
    """A nargs flag's value: a list when typed, the default string otherwise."""
    return list(value) if isinstance(value, (list, tuple)) else value.split()


def check(study: str, cfg: AblateConfig) -> tuple[list[str], list[int]]:
    """(arms, seeds) to run; a bad input raises ValueError (one line, exit 2)."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)}")
    known = list(STUDIES[study]["arms"])
    arms = as_list(cfg.arms) or known              # no --arms: the whole study, in the order of STUDIES
    bad = [a for a in arms if a not in known]
    if bad:
        raise ValueError(f"unknown arm {bad[0]!r} of study {study}; choose from {', '.join(known)}")
    try:
        seeds = [int(s) for s in as_list(cfg.seeds)]
    except ValueError:
        raise ValueError(f"--seeds takes integers, got {' '.join(as_list(cfg.seeds))}") from None
    if study == "resolution" and cfg.res:
        raise ValueError("the resolution study sets --res per arm; choose resolutions with --arms 32 64 128")
    for name in ("steps", "batch_size", "num_scenes", "num_samples", "sample_steps", "sample_batch",
                 "kid_subset_size", "kid_subsets"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 (FID and KID need two images), got {cfg.num_samples}")
    return list(dict.fromkeys(arms)), list(dict.fromkeys(seeds))   # duplicates dropped, order kept


def compared(study: str, cfg: AblateConfig) -> dict:
    """What a results folder must agree on: every flag but the runtime ones, with the res resolved."""
    # Adding arms or seeds later only adds rows; a changed --steps or --lr would mix incomparable rows.
    d = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}
    return {"study": study, **d, "res": cfg.res or STUDIES[study]["res"]}


def refuse_if_different(old: dict, new: dict, where: Path) -> None:
    diff = [f"{k}: {old.get(k)!r} (stored) vs {new.get(k)!r} (now)"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"{where} was made with another configuration ({'; '.join(diff)}); use the same "
                         f"flags, or another --out (nothing was overwritten)")


# ----------------------------------------------------------------------------------------------------
# The measuring instruments: Inception, real reference statistics, the shape classifier

def inception(cfg: AblateConfig) -> torch.nn.Module:
    if cfg.fid_weights:
        return load_inception(cfg.fid_weights, download=False)
    log("\n" + "!" * 100 + "\nWARNING: no --fid-weights: the Inception network is RANDOMLY initialised. "
               "The 'FID' and 'KID'\nbelow are NOT FID or KID and mean nothing beyond this run. Pass "
               "--fid-weights pt_inception-2015-12-05-6726825d.pth.\n" + "!" * 100)
    torch.manual_seed(0)                            # the same random network in every run: rows stay comparable
    model = InceptionV3().eval().requires_grad_(False)
    model.weights_id = "random-init"
    return model


def reference(res: int, cfg: AblateConfig, net, out: Path) -> fid.FIDStats:
    """FID statistics (with features, for KID) of N real scenes at `res`, cached under <out>/reference."""
    path = out / "reference" / f"scenes-seed{REFERENCE_SEED}-res{res}-n{cfg.num_samples}-{net.weights_id}.npz"
    if path.exists():                               # the file name holds everything the statistics depend on
        return fid.load_stats(path)
    real = Scenes(cfg.num_samples, res, class_cond=True, seed=REFERENCE_SEED, cache=True).images  # (N, 3, d, d) u8
    stats = fid.compute_stats_from_tensors(real, net, keep_features=True)
    fid.save_stats(path, stats)
    return stats


# ----------------------------------------------------------------------------------------------------
# One arm: train, sample, score

def train_argv(study: str, arm: str, seed: int, cfg: AblateConfig, run_dir: Path) -> list[str]:
    """train.py's flags for one arm: every number explicit (so train.py's paper-scale preset rows for
    64 px and up do not apply), then the study's shared settings, then the arm's own."""
    res = STUDIES[study]["arms"][arm].get("res") or cfg.res or STUDIES[study]["res"]
    shared = dict(res=res, model="unet", preset=cfg.preset or SCENE_PRESETS.get(res, "small"), steps=cfg.steps,
                  batch_size=cfg.batch_size, lr=cfg.lr, warmup=min(100, cfg.steps), cooldown=1 / 3,
                  ema_decay=0.999, num_scenes=cfg.num_scenes, seed=seed, run_dir=str(run_dir), num_workers=0,
                  log_every=min(50, cfg.steps), ckpt_every=500, sample_every=0, sample_steps=cfg.sample_steps,
                  num_samples=min(16, cfg.num_samples))
    s = {**shared, **STUDIES[study]["fixed"], **STUDIES[study]["arms"][arm]}   # later entries win
    argv = []                                       # {"multiscale": False} -> --no-multiscale, lr -> --lr 0.004
    for k, v in s.items():
        name = "--" + k.replace("_", "-")
        argv += ([name] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [name, str(v)]
    return argv


def run_training(argv: list[str], run_dir: Path) -> float:
    """train.main in this process; returns the training minutes summed over every call for this arm (a
    resumed arm counts its earlier parts too). train.py's signal handlers are undone afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    clock, t0 = run_dir / "ablate_train_seconds.txt", time.time()
    try:                                            # in-process: no second torch import, and tests stay fast
        train.main(argv)
    except SystemExit as e:   # train.py reports its own one-line error
        raise RuntimeError(f"train.py exited with code {e.code} (its error line is above)") from None
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if run_dir.exists():                        # also after a failure or Ctrl-C: minutes spent are minutes spent
            before = float(clock.read_text()) if clock.exists() else 0.0
            data.write_atomic(clock, lambda f: f.write(f"{before + time.time() - t0:.1f}".encode()))
    return float(clock.read_text()) / 60


@torch.no_grad()
def draw_samples(run_dir: Path, cfg: AblateConfig) -> torch.Tensor:
    """N EMA samples (N, 3, d, d) uint8 from seeds 0..N-1, asking for class seed % 3."""
    model, ckpt = load_model(run_dir, "ema")
    if ckpt["step"] < cfg.steps:   # train.py returned early: it was signalled and saved
        raise Interrupted(f"{run_dir} stopped at step {ckpt['step']} of {cfg.steps}")
    schedule, res = Schedule(**ckpt["schedule"]), ckpt["config"]["res"]
    out = []                                        # per-image generators: batches do not change the images
    for start in range(0, cfg.num_samples, cfg.sample_batch):
        seeds = range(start, min(start + cfg.sample_batch, cfg.num_samples))
        labels = torch.tensor(list(seeds)) % len(KINDS)
        x = sample(model, (len(seeds), 3, res, res), schedule, cfg.sample_steps, class_labels=labels,
                   guidance=cfg.guidance, seeds=seeds, progress=False)
        out.append(data.quantize(x))                # (b, 3, d, d) uint8: exactly the pixels of a PNG
    return torch.cat(out)


def score(images: torch.Tensor, ref: fid.FIDStats, net, classifier, cfg: AblateConfig) -> dict:
    """FID@N, KID +- std (and the subset size it used), and the shape score of uint8 samples."""
    gen = fid.compute_stats_from_tensors(images, net, keep_features=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # small N: fid.py's warnings are summarised in the table notes
        kid, kid_std = fid.kernel_inception_distance(gen.features, ref.features, cfg.kid_subset_size,
                                                     cfg.kid_subsets)
    labels = torch.arange(len(images)) % len(KINDS)                 # the classes draw_samples asked for
    shapes = shape_score(images, labels, classifier) if classifier is not None else None
    return {"fid": fid.frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma), "kid": kid, "kid_std": kid_std,
            "kid_subset_size": min(cfg.kid_subset_size, len(images), ref.n),
            "shape_score": shapes and shapes["score"], "shape_per_kind": shapes and shapes["per_kind"]}


def fourier_wiener_x_pred(z_t: torch.Tensor, alpha, sigma, train_x: torch.Tensor) -> torch.Tensor:
    """The best linear denoiser of a stationary image model: the MMSE x_pred of a Gaussian with train_x's
    per-channel mean and power spectrum. In the orthonormal 2-D Fourier basis the covariance is diagonal
    and white noise stays white, so each coefficient shrinks by alpha P / (alpha^2 P + sigma^2)."""
    mean = train_x.double().mean(dim=(0, 2, 3), keepdim=True)                              # (1, C, 1, 1)
    power = torch.fft.fft2(train_x.double() - mean, norm="ortho").abs().square().mean(0)   # (C, H, W)
    a, s = torch.as_tensor(alpha).double(), torch.as_tensor(sigma).double()
    z_hat = torch.fft.fft2(z_t.double() - a * mean, norm="ortho")                          # (B, C, H, W)
    return (torch.fft.ifft2(a * power / (a * a * power + s * s) * z_hat, norm="ortho").real + mean).float()


@torch.no_grad()
def denoise_check(run_dir: Path) -> dict:
    """{log-SNR: x_pred MSE of the EMA network / the Wiener filter's} on DENOISE_IMAGES held-out scenes
    (REFERENCE_SEED), the same noise draws for both and for every arm."""
    model, ckpt = load_model(run_dir, "ema")
    res, class_cond = ckpt["config"]["res"], ckpt["config"]["class_cond"]
    train_x = data.u8_to_x(Scenes(512, res, seed=0, cache=True).images.numpy())             # (512, 3, d, d)
    held = Scenes(DENOISE_IMAGES, res, class_cond=True, seed=REFERENCE_SEED, cache=True)
    x, labels = data.u8_to_x(held.images.numpy()), held.kinds if class_cond else None     # (n, 3, d, d)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    ratios = {}
    for value in DENOISE_LOGSNRS:
        logsnr, (alpha, sigma) = torch.full((len(x),), value), alpha_sigma(torch.tensor(value))
        z_t, x_net = diffuse(x, logsnr, eps), torch.empty_like(x)
        for i in range(0, len(x), 16):              # batches of 16: memory only
            b = slice(i, i + 16)
            x_net[b] = x_from_v(z_t[b], model(z_t[b], logsnr[b], None if labels is None else labels[b]), logsnr[b])
        x_lin = fourier_wiener_x_pred(z_t, alpha, sigma, train_x)
        ratios[str(value)] = ((x_net - x).square().mean() / (x_lin - x).square().mean()).item()
    return ratios


def run_arm(study, arm, seed, cfg, tools, out: Path) -> dict:
    """Train (or resume) one arm, sample it, score it and write its metrics.json; returns the row."""
    run_dir = out / "runs" / study / f"{arm}-seed{seed}"
    minutes = run_training(train_argv(study, arm, seed, cfg, run_dir), run_dir)
    saved = run_dir / "samples.npz"                 # drawn before, by the same flags (the folder's config)
    if not saved.exists():
        t0 = time.time()
        images = draw_samples(run_dir, cfg)         # raises Interrupted if training was stopped by a signal
        data.write_atomic(saved, lambda f: np.savez_compressed(f, images=images.numpy(),
                                                               minutes=(time.time() - t0) / 60))
    stored = np.load(saved)
    images, sample_minutes = torch.from_numpy(stored["images"]), stored.get("minutes")
    res = images.shape[-1]                          # the resolution study measures each arm at its own d
    if res not in tools["refs"]:
        tools["refs"][res] = reference(res, cfg, tools["net"], out)
    if "classifier" not in tools:
        tools["classifier"] = shape_classifier(cfg.shape_cache or None, log=log) if cfg.shape_score else None
    row = {"arm": arm, "seed": seed, "status": "done", "steps": cfg.steps, "res": res,
           "train_minutes": round(minutes, 2),
           "sample_minutes": None if sample_minutes is None else round(float(sample_minutes), 4),
           **score(images, tools["refs"][res], tools["net"], tools["classifier"], cfg),
           "denoise": denoise_check(run_dir)}
    # Written last: its existence is what marks the arm finished (and it records the config it was made by).
    write_json(run_dir / "metrics.json", {**row, "config": compared(study, cfg)})
    return row


def finished_row(run_dir: Path, now: dict | None) -> dict:
    """The row of a finished arm's metrics.json, refused if its config is not `now` (None: not checked);
    a row scored before the denoising check existed gets it now."""
    done = json.loads((run_dir / "metrics.json").read_text())
    config = done.pop("config")
    if now is not None:
        refuse_if_different(config, now, run_dir / "metrics.json")
    if "denoise" not in done:
        done["denoise"] = denoise_check(run_dir)
        write_json(run_dir / "metrics.json", {**done, "config": config})
    return done


def trained_elsewhere(study: str, arm: str, seed: int, cfg: AblateConfig, out: Path) -> Path | None:
    """The folder of a finished arm of another study that trained, sampled and scored exactly what this arm
    would (the loss study's eps arm is the schedule study's shifted arm), else None."""
    def plain(obj):                                 # through JSON, as the stored files are: tuples -> lists
        return json.loads(json.dumps(obj))
    train_cfg = plain(asdict(train.resolve_config(train_argv(study, arm, seed, cfg, Path(".")))))
    scoring = plain({k: v for k, v in compared(study, cfg).items() if k not in ("study", "res")})
    for metrics in sorted((out / "runs").glob("*/*/metrics.json")):
        folder = metrics.parent
        if folder.parent.name == study or not (folder / "config.json").exists():
            continue
        theirs = {k: v for k, v in json.loads(metrics.read_text())["config"].items() if k not in ("study", "res")}
        their_train = json.loads((folder / "config.json").read_text())
        if theirs == scoring and {**their_train, "run_dir": "."} == {**train_cfg, "run_dir": "."}:
            return folder
    return None


def reuse_arm(source: Path, study: str, arm: str, seed: int, cfg: AblateConfig, out: Path) -> dict:
    """This arm's row and folder (samples and metrics, no checkpoints) copied from an identical run."""
    done = finished_row(source, None)               # another study's config: not compared
    run_dir = out / "runs" / study / f"{arm}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "samples.npz", run_dir / "samples.npz")
    row = {**done, "arm": arm, "seed": seed, "reused_from": source.relative_to(out).as_posix()}
    write_json(run_dir / "metrics.json", {**row, "config": compared(study, cfg)})
    return row


# ----------------------------------------------------------------------------------------------------
# Results: <out>/<study>.md, .json and .png, rewritten after every arm

def write_json(path: Path, obj) -> None:
    data.write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def notes(cfg: AblateConfig, weights_id: str, rows: list[dict]) -> list[str]:
    n = cfg.num_samples
    lines = [f"FID@{n} and KID: {n} samples per arm (seeds 0..{n - 1}, class seed % 3, {cfg.sample_steps} "
             f"steps, guidance w = {cfg.guidance}) against {n} real scenes (scene seed {REFERENCE_SEED}) at the "
             f"arm's resolution; Inception weights {weights_id}. FID at small N is biased upward: compare rows."]
    used = {r["kid_subset_size"] for r in rows if r["status"] == "done"}
    if any(m >= n for m in used):
        lines.append(f"KID: subsets of {', '.join(map(str, sorted(used)))} out of N = {n} images are the whole set, "
                     f"so the std is 0 and no error bar (pass --kid-subset-size below N for one).")
    lines.append(f"Denoising check: the x_pred MSE of each arm's EMA network on {DENOISE_IMAGES} held-out scenes ÷ that of the "
                 f"best linear denoiser (the Fourier Wiener filter of the training scenes), same noise; below 1 "
                 f"the network beats every linear filter. Sampling minutes: drawing the N samples here.")
    for r in rows:
        if r.get("reused_from"):
            lines.append(f"{r['arm']}, seed {r['seed']}: the same training, sampling and scoring as {r['reused_from']} "
                         f"(another study's arm), so that run's row and samples were reused.")
    if weights_id == "random-init":
        lines.append("**WARNING: random Inception weights (no --fid-weights): these are NOT FID/KID values.**")
    if not cfg.shape_score:
        lines.append("Shape score skipped (--no-shape-score): shown as -.")
    return lines


def write_results(study: str, cfg: AblateConfig, weights_id: str, rows: dict, out: Path) -> None:
    # Rows in the study's arm order, then by seed, whatever order they were run or stored in.
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (list(STUDIES[study]["arms"]).index(rows[k]["arm"]),
                                                              rows[k]["seed"]))]
    n = cfg.num_samples
    snrs = " / ".join(f"{v:g}" for v in DENOISE_LOGSNRS)
    md = [f"# Ablation: {study}", "", f"| arm | train seed | steps | training minutes here | sampling minutes here | "
          f"FID@{n} | KID ± std | shape score | denoising x-MSE ÷ linear filter's, log-SNR {snrs} |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in ordered:
        if r["status"] != "done":                   # the error's first words, in the minutes column
            md.append(f"| {r['arm']} | {r['seed']} | {cfg.steps} | failed: {r['error'][:120]} | - | - | - | - | - |")
            continue
        ratios = " / ".join(f"{v:.2f}" for v in r["denoise"].values()) if r.get("denoise") else "-"
        md.append(f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['train_minutes']:.1f} | "
                  f"{fmt(r.get('sample_minutes'), '.1f')} | {r['fid']:.4g} | {r['kid']:.3g} ± {r['kid_std']:.2g} | "
                  f"{fmt(r['shape_score'], '.3f')} | {ratios} |")
    md += [""] + [f"- {line}" for line in notes(cfg, weights_id, ordered)]
    data.write_atomic(out / f"{study}.md", lambda f: f.write(("\n".join(md) + "\n").encode()))
    write_json(out / f"{study}.json", {"study": study, "config": compared(study, cfg), "inception": weights_id,
                                       "notes": notes(cfg, weights_id, ordered), "rows": ordered})
    draw_rows([r for r in ordered if r["status"] == "done"], out, study)


def draw_rows(rows: list[dict], out: Path, study: str, label_w: int = 120) -> None:
    """One row per arm of the first ROW_IMAGES samples (the same seeds in every row), labelled on the left;
    images are enlarged (nearest) to a common size of at least 64 px."""
    if not rows:
        return
    strips = [np.load(out / "runs" / study / f"{r['arm']}-seed{r['seed']}" / "samples.npz")["images"][:ROW_IMAGES]
              for r in rows]                                               # each (k, 3, d, d) uint8
    # Rows of another resolution (the resolution study) are scaled to the largest, so the pixels compare.
    size, k = max(64, max(s.shape[-1] for s in strips)), max(len(s) for s in strips)
    canvas = Image.new("RGB", (label_w + k * (size + 2), len(rows) * (size + 2)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, (r, strip) in enumerate(zip(rows, strips)):
        y = i * (size + 2)
        draw.text((4, y + size // 2 - 6), f"{r['arm']} (seed {r['seed']})", fill="black", font=font)
        for j, im in enumerate(strip):
            tile = Image.fromarray(im.transpose(1, 2, 0)).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (size + 2), y))
    data.write_atomic(out / f"{study}.png", lambda f: canvas.save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------
# The study: every arm x seed, with a progress bar

@contextlib.contextmanager
def study_lock(path: Path):
    """One ablate.py per study and results folder: a second would train the same arm in the same folder
    (each taking the other's half-written checkpoint for corrupt) and overwrite the other's rows. The
    file holds the owner's pid; the lock of a process that no longer exists is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = int(path.read_text().strip() or 0)
            if attempt == 0 and not process_exists(owner):
                path.unlink(missing_ok=True)    # left by a killed run
                continue
            raise ValueError(f"another ablate.py (pid {owner}) is running this study in {path.parent.parent}; "
                             f"wait for it, or stop it (it saves and resumes); else delete {path}") from None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)                         # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                             # exists, owned by someone else
    return True


def run_study(study: str, cfg: AblateConfig) -> int:
    """Returns the exit code: 0 all arms done, 1 some failed, 130 interrupted."""
    arms, seeds = check(study, cfg)
    out, now = Path(cfg.out), compared(study, cfg)
    stored_path = out / f"{study}.json"
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else None
    if stored is not None:   # refuse before anything is loaded, trained or written
        refuse_if_different(stored["config"], now, stored_path)
    with study_lock(out / "runs" / f"{study}.lock"):
        return run_arms(study, cfg, arms, seeds, now, stored)


def run_arms(study: str, cfg: AblateConfig, arms: list, seeds: list, now: dict, stored: dict | None) -> int:
    out, stored_path = Path(cfg.out), Path(cfg.out) / f"{study}.json"
    net = inception(cfg)
    if stored is not None and stored["inception"] != net.weights_id:
        raise ValueError(f"{stored_path} was made with Inception weights {stored['inception']}, now "
                         f"{net.weights_id}; use the same weights, or another --out (nothing was overwritten)")
    # Rows are keyed by arm and seed: earlier rows (other --arms or --seeds) stay in the table.
    rows = {f"{r['arm']}-seed{r['seed']}": r for r in (stored or {}).get("rows", [])}
    tools, code = {"net": net, "refs": {}}, 0   # the classifier is loaded (or trained) when first needed
    jobs = [(a, s) for a in arms for s in seeds]
    bar = tqdm(jobs, desc=f"study {study}", unit="arm", position=1, dynamic_ncols=True)
    for arm, seed in bar:
        key, run_dir = f"{arm}-seed{seed}", out / "runs" / study / f"{arm}-seed{seed}"
        bar.set_postfix_str(key)
        if (run_dir / "metrics.json").exists():     # finished earlier: no training, sampling or scoring
            rows[key] = finished_row(run_dir, now)
            log(f"{key}: finished earlier, skipped")
            continue
        source = trained_elsewhere(study, arm, seed, cfg, out)
        if source is not None:                      # identical training and scoring: a copy, not a rerun
            rows[key] = reuse_arm(source, study, arm, seed, cfg, out)
            log(f"{key}: the same run as {source}, reused")
            write_results(study, cfg, net.weights_id, rows, out)
            continue
        try:
            rows[key] = run_arm(study, arm, seed, cfg, tools, out)
        except (Interrupted, KeyboardInterrupt) as e:
            log(f"interrupted ({e or 'Ctrl-C'}): rerun the same command to resume")
            return 130
        except Exception as e:   # a failed arm is recorded; the others go on
            rows[key] = {"arm": arm, "seed": seed, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            log(f"{key}: FAILED ({rows[key]['error']})")
            code = 1
        write_results(study, cfg, net.weights_id, rows, out)   # after every arm: Ctrl-C loses one arm at most
    bar.close()
    write_results(study, cfg, net.weights_id, rows, out)
    log(f"results: {out / study}.md, .json, .png")
    return code


def main(argv=None) -> int:
    """CLI: bad inputs print one `error: ...` line and exit 2."""
    study, cfg = parse(argv)
    try:
        return run_study(study, cfg)
    except ValueError as e:
        return data.error_exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
