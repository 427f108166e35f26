"""
Tests for train.py: the CLI and presets, the bad inputs train.py must refuse, and the
fault-tolerance promises, each checked by running the real command in a subprocess on tiny settings
(the "tiny" U-Net at 16x16, a handful of steps, a few dozen built-in scenes).

What is checked, and against what:
- config: flags override the (model, res) preset row, which overrides the dataclass defaults; --help
  lists every TrainConfig field.
- bad inputs: batch not divisible by world size x accumulation; fewer images than one global batch
  (folder and built-in); a run folder holding another config's checkpoint (error naming the fields,
  every file byte-identical afterwards); --resume of a missing file; --res that the network cannot
  down-sample; a missing --data folder; a runaway loss (non-finite steps skipped, then exit 1 naming the
  step, no checkpoint written). All before any file is written, each as one `error:` line.
- data order: the ranks' shards are disjoint and cover each global batch exactly once.
- checkpoints: load with weights_only=True, carry the contract's keys, no "_orig_mod."/"module."
  prefixes, load strictly into a fresh network, only the last two kept.
- exact resume (a second route to the same number): 3 steps + resume to 6 == 6 uninterrupted steps, bit for
  bit (model, EMA, optimizer), across epoch boundaries, with grad accumulation, flips, label dropout;
  the same after a corrupt newest checkpoint (fallback to the previous one, file kept as .corrupt).
- SIGTERM: checkpoint at the step boundary, exit 0, and the same command resumes from it.
- torchrun --nproc_per_node=2 (gloo): both ranks end with identical weights, equal to the checkpoint; each
  rank's DDP gradient of half a batch equals one process's gradient of the whole batch (so does gradient
  accumulation); FSDP2 equals DDP.
- a non-finite step is skipped on the device: weights and AdamW state unchanged, reported a step later.
- a torch.compile failure falls back to the eager forward with one warning; a failed save (disk full)
  leaves the previous checkpoint intact; EMA and warm-up against their closed forms.
- it learns (sigmoid and eps objectives): see test_it_learns for the closed-form and Wiener references.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import scenes
from ablate import fourier_wiener_x_pred   # tested against the pixel-space LMMSE in test_ablate
import checkpoint
import train

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")
# Tiny and fast: 16x16 "tiny" U-Net, 16 scenes (2 global batches of 8 per epoch), no periodic grids.
TINY = ["--res", "16", "--num-scenes", "16", "--batch-size", "8", "--log-every", "1", "--sample-every", "0",
        "--num-samples", "4", "--sample-steps", "2"]


# One thread per process: the tiny networks gain nothing from two, and on a shared 2-core machine
# OpenMP threads spinning against other processes can slow a step down tenfold.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, TRAIN, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_optimizer(a: dict, b: dict) -> bool:
    return a["state"].keys() == b["state"].keys() and all(
        same_tensors(a["state"][k], b["state"][k]) for k in a["state"])


def tree_digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------
# Config, CLI, data order (in-process, no training)

@pytest.mark.slow
def test_help_lists_every_config_field():
    proc = run(["--help"], cwd=REPO)
    assert proc.returncode == 0
    for f in train.dataclasses.fields(train.TrainConfig):
        assert "--" + f.name.replace("_", "-") in proc.stdout


def test_presets_and_explicit_flags():
    default = train.resolve_config([])
    assert (default.model, default.res, default.preset, default.data) == ("unet", 32, "small", "")
    assert default.run_dir == "runs/unet-32"
    big = train.resolve_config(["--res", "256"])
    assert big.preset == "256" and big.multiscale and big.batch_size == 512 and big.run_dir == "runs/unet-256"
    # An explicit flag beats the preset row, including turning a preset's boolean off.
    over = train.resolve_config(["--res", "256", "--no-multiscale", "--lr", "3e-4", "--batch-size", "64"])
    assert not over.multiscale and over.lr == 3e-4 and over.batch_size == 64 and over.preset == "256"
    assert train.resolve_config(["--model", "uvit", "--res", "64"]).preset == "64"
    # 48 px: log2(64/48) = 0.42 < log2(48/32) = 0.58, so the 64 row (its model preset, res 48).
    odd = train.resolve_config(["--res", "48"])
    assert odd.preset == "64" and odd.res == 48
    flags = train.resolve_config(["--class-cond", "--no-flip", "--compile", "--precision", "fp32"])
    assert flags.class_cond and not flags.flip and flags.compile is True and flags.precision == "fp32"
    assert default.compile is None  # "auto": decided by the device
    # Class labels: "auto" = on for the built-in scenes (the shape kind), off for a folder; flags win.
    assert default.class_cond is True and train.resolve_config(["--data", "DIR"]).class_cond is False
    assert train.resolve_config(["--no-class-cond"]).class_cond is False
    assert train.resolve_config(["--data", "DIR", "--class-cond"]).class_cond is True
    assert default.cooldown > 0 and big.cooldown == 0   # the demo decays its LR, paper rows stay constant


def test_batch_must_divide_by_world_size_times_accumulation():
    cfg = train.resolve_config(["--batch-size", "12", "--grad-accum", "4"])
    train.check_config(cfg, world_size=1)                           # 12 = 3 x (1 x 4): fine
    with pytest.raises(train.ConfigError, match=r"--batch-size 12 .* world size 2 x --grad-accum 4 = 8"):
        train.check_config(cfg, world_size=2)


def test_shards_are_disjoint_and_cover_each_global_batch():
    n, g, accum, world = 40, 12, 2, 3                              # micro-batches of 12 / (3 x 2) = 2
    streams = [iter(data.ShardSampler(n, g, accum, r, world, seed=5)) for r in range(world)]
    for b in range(2 * (n // g)):                                    # two epochs
        epoch, k = divmod(b, n // g)
        expected = data.epoch_permutation(5, epoch, n)[k * g:(k + 1) * g].tolist()
        got = [next(s) for s in streams for _ in range(accum)]      # rank-major
        flat = [i for micro in got for i in micro]
        assert all(len(m) == 2 for m in got)
        assert sorted(flat) == sorted(expected) and len(set(flat)) == g
    # A sampler restarted at (epoch 1, batch 1) continues exactly where the stream was.
    fresh = [iter(data.ShardSampler(n, g, accum, 0, world, 5)) for _ in range(1)][0]
    for _ in range((n // g + 1) * accum):
        next(fresh)
    resumed = iter(data.ShardSampler(n, g, accum, 0, world, 5, epoch=1, batch=1))
    assert [next(resumed) for _ in range(5)] == [next(fresh) for _ in range(5)]


# ----------------------------------------------------------------------------------------------------
# Bad inputs through the CLI (exit 2, one `error:` line)

@pytest.mark.slow
def test_cli_batch_not_divisible(tmp_path):
    proc = run([*TINY, "--batch-size", "10", "--grad-accum", "3", "--run-dir", tmp_path / "r"], tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "--batch-size 10" in line and "--grad-accum 3" in line and "multiple of 3" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_fewer_images_than_one_batch(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(folder / f"{i}.png")
    proc = run([*TINY, "--data", folder, "--batch-size", "4", "--run-dir", tmp_path / "r"], tmp_path)
    assert proc.returncode == 2 and "3 images" in error_line(proc) and "4" in error_line(proc)
    proc = run([*TINY, "--num-scenes", "3", "--batch-size", "4", "--run-dir", tmp_path / "r"], tmp_path)
    assert proc.returncode == 2 and "3 images" in error_line(proc)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_bad_resolution_and_missing_data(tmp_path):
    proc = run([*TINY, "--res", "17", "--run-dir", tmp_path / "r"], tmp_path)   # tiny: 2x2 stem, 2 levels
    assert proc.returncode == 2
    assert "factor 4" in error_line(proc) and "nearest valid res: 16" in error_line(proc)
    proc = run([*TINY, "--data", tmp_path / "nowhere", "--run-dir", tmp_path / "r"], tmp_path)
    assert proc.returncode == 2 and str(tmp_path / "nowhere") in error_line(proc)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_resume_missing_file(tmp_path):
    missing = tmp_path / "nope" / "ckpt_00000010.pt"
    proc = run([*TINY, "--resume", missing, "--run-dir", tmp_path / "r"], tmp_path)
    assert proc.returncode == 2 and str(missing) in error_line(proc)


@pytest.mark.slow
def test_run_dir_with_another_config_is_refused_and_kept(tmp_path):
    run_dir = tmp_path / "r"
    assert run([*TINY, "--steps", "2", "--lr", "1e-3", "--run-dir", run_dir], tmp_path).returncode == 0
    before = tree_digest(run_dir)
    proc = run([*TINY, "--steps", "4", "--lr", "5e-4", "--no-flip", "--run-dir", run_dir], tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "lr: 0.001 (checkpoint) vs 0.0005 (now)" in line and "flip: True (checkpoint) vs False (now)" in line
    assert "steps" not in line.split("run:")[1]       # --steps may change: it extends a run
    assert tree_digest(run_dir) == before             # nothing written, renamed or deleted


@pytest.mark.slow
def test_runaway_loss_is_skipped_then_aborts_without_saving(tmp_path):
    # lr 1e30: the first update is finite (about +-1e30 per weight, Adam's step is ~lr), after which the
    # network's output overflows, so every later step is non-finite and must be skipped.
    proc = run([*TINY, "--steps", "50", "--lr", "1e30", "--warmup", "0", "--ckpt-every", "1000",
                "--run-dir", tmp_path / "r"], tmp_path)
    assert proc.returncode == 1
    line = error_line(proc)
    assert f"not finite for {train.MAX_BAD_STEPS} steps in a row" in line and "step " in line
    assert proc.stderr.count("step skipped") == train.MAX_BAD_STEPS
    assert not list((tmp_path / "r").glob("ckpt_*"))


# ----------------------------------------------------------------------------------------------------
# Checkpoints, resume, signals

@pytest.mark.slow
def test_smoke_run_and_checkpoint_format(tmp_path):
    run_dir = tmp_path / "r"
    proc = run([*TINY, "--steps", "6", "--ckpt-every", "2", "--class-cond", "--run-dir", run_dir], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpts = checkpoint.find_checkpoints(run_dir)
    assert [p.name for p in ckpts] == ["ckpt_00000006.pt", "ckpt_00000004.pt"]   # the last two only
    ckpt = load(ckpts[0])                                                         # weights_only=True
    for key in ("step", "model_name", "model_config", "model", "ema", "optimizer", "schedule", "config",
                "class_names", "data_state", "rng_state"):
        assert key in ckpt
    assert ckpt["step"] == 6 and ckpt["model_name"] == "unet" and ckpt["class_names"] == list(scenes.KINDS)
    assert ckpt["config"] == json.loads((run_dir / "config.json").read_text())
    for weights in ("model", "ema"):
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt[weights])
        net = checkpoint.build_model(ckpt["model_name"], ckpt["model_config"])
        net.load_state_dict(ckpt[weights], strict=True)
    # 6 steps of 8 images over 16 scenes: 3 whole epochs.
    assert (ckpt["data_state"]["epoch"], ckpt["data_state"]["batch"]) == (3, 0)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in records)
    grid = Image.open(run_dir / "samples" / "step_00000006.png")
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)        # 4 samples: 2 x 2 tiles, 2 px padding
    assert Image.open(run_dir / "loss_curve.png").size[0] > 100


RESUME = [*TINY, "--grad-accum", "2", "--class-cond", "--label-dropout", "0.5", "--ckpt-every", "2"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """6 uninterrupted steps; the resume tests must reproduce its final checkpoint bit for bit."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run([*RESUME, "--steps", "6", "--run-dir", tmp / "r"], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load(tmp / "r" / "ckpt_00000006.pt")


def assert_same_training_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    assert same_tensors(a["model"], b["model"]) and same_tensors(a["ema"], b["ema"])
    assert same_optimizer(a["optimizer"], b["optimizer"])
    assert a["data_state"] == b["data_state"]


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path, reference_run):
    # Stop after 3 steps; continue from that file (--resume) into a new folder; and, in the same folder,
    # by running the command again (automatic resume). Both must land on the uninterrupted run's state.
    first, moved = tmp_path / "a", tmp_path / "b"
    assert run([*RESUME, "--steps", "3", "--run-dir", first], tmp_path).returncode == 0
    proc = run([*RESUME, "--steps", "6", "--resume", first / "ckpt_00000003.pt", "--run-dir", moved], tmp_path)
    assert proc.returncode == 0 and "at step 3" in proc.stderr, proc.stderr[-2000:]
    assert_same_training_state(load(moved / "ckpt_00000006.pt"), reference_run)
    proc = run([*RESUME, "--steps", "6", "--run-dir", first], tmp_path)
    assert proc.returncode == 0 and f"resumed from {first} at step 3" in proc.stderr
    assert_same_training_state(load(first / "ckpt_00000006.pt"), reference_run)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back(tmp_path, reference_run):
    run_dir = tmp_path / "r"
    assert run([*RESUME, "--steps", "4", "--run-dir", run_dir], tmp_path).returncode == 0
    newest = run_dir / "ckpt_00000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])      # truncated, as by a crash
    (run_dir / "ckpt_00000005.pt.tmp").write_bytes(b"partial")                 # a kill -9 during a save
    proc = run([*RESUME, "--steps", "6", "--run-dir", run_dir], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ckpt_00000004.pt" in proc.stderr and "at step 2" in proc.stderr     # warned, fell back to 2
    assert (run_dir / "ckpt_00000004.pt.corrupt").exists()                     # kept, not deleted
    assert not (run_dir / "ckpt_00000005.pt.tmp").exists()
    assert_same_training_state(load(run_dir / "ckpt_00000006.pt"), reference_run)


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_exits_0(tmp_path):
    run_dir = tmp_path / "r"
    args = [sys.executable, TRAIN, *TINY, "--steps", "100000", "--ckpt-every", "0", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    ckpts = checkpoint.find_checkpoints(run_dir)
    assert len(ckpts) == 1
    step = load(ckpts[0])["step"]
    assert 2 <= step < 100000 and f"stopped at step {step}" in err
    # The same command (with a reachable --steps) resumes from that checkpoint.
    again = run([*TINY, "--steps", step + 1, "--ckpt-every", "0", "--run-dir", run_dir], tmp_path)
    assert again.returncode == 0 and f"at step {step}" in again.stderr
    assert load(checkpoint.find_checkpoints(run_dir)[0])["step"] == step + 1


WRAPPER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train
model, ema = train.main(sys.argv[1:])
out = os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt")
torch.save({{"model": model.state_dict(), "ema": ema.state_dict()}}, out)
"""


@pytest.mark.slow
def test_torchrun_two_ranks_end_identical(tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           *TINY, "--steps", "4", "--run-dir", str(tmp_path / "r")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    ckpt = load(tmp_path / "r" / "ckpt_00000004.pt")
    assert same_tensors(r0["model"], r1["model"]) and same_tensors(r0["ema"], r1["ema"])
    assert same_tensors(r0["model"], ckpt["model"])             # rank 0 saved what it trained, no prefixes
    assert ckpt["rng_state"]["world_size"] == 2
    # Distinct noise per rank: the two ranks' generator states differ.
    assert not torch.equal(ckpt["rng_state"]["noise"][0], ckpt["rng_state"]["noise"][1])
    # The weights moved away from the shared initialisation (so "identical" is not trivially true).
    torch.manual_seed(0)                                          # the run's --seed
    init = checkpoint.build_model("unet", ckpt["model_config"])
    assert not same_tensors(init.state_dict(), r0["model"])


def torchrun(args, cwd, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN,
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_fsdp_equals_ddp_resumes_exactly_and_samples(tmp_path):
    """FSDP2 (gloo, 2 CPU processes) against a second route to the same numbers: DDP on the same data and
    noise must end with the same weights up to float rounding (the gradient is reduced in another order);
    an FSDP run stopped after 2 steps and resumed must end bit-identical to an uninterrupted one; a DDP
    checkpoint resumes under FSDP; sample.py reads an FSDP checkpoint in one process."""
    common = ["--model", "uvit", *TINY, "--sample-every", "0"]
    torchrun([*common, "--steps", "4", "--run-dir", tmp_path / "ddp"], tmp_path)
    torchrun([*common, "--steps", "4", "--fsdp", "--run-dir", tmp_path / "fsdp"], tmp_path)
    ddp, fsdp = load(tmp_path / "ddp" / "ckpt_00000004.pt"), load(tmp_path / "fsdp" / "ckpt_00000004.pt")
    for key in ("model", "ema"):
        assert ddp[key].keys() == fsdp[key].keys()
        for name in ddp[key]:
            torch.testing.assert_close(fsdp[key][name], ddp[key][name], rtol=1e-5, atol=1e-6)
    init = checkpoint.build_model("uvit", ddp["model_config"])
    assert not all(torch.equal(init.state_dict()[k], ddp["model"][k]) for k in ddp["model"])   # it moved
    torchrun([*common, "--steps", "2", "--fsdp", "--run-dir", tmp_path / "resumed"], tmp_path)
    proc = torchrun([*common, "--steps", "4", "--fsdp", "--run-dir", tmp_path / "resumed"], tmp_path)
    assert "at step 2" in proc.stderr
    assert_same_training_state(load(tmp_path / "resumed" / "ckpt_00000004.pt"), fsdp)
    torchrun([*common, "--steps", "2", "--run-dir", tmp_path / "cross"], tmp_path)                 # DDP ...
    torchrun([*common, "--steps", "4", "--fsdp", "--run-dir", tmp_path / "cross"], tmp_path)       # ... then FSDP
    cross = load(tmp_path / "cross" / "ckpt_00000004.pt")
    for name in ddp["model"]:
        torch.testing.assert_close(cross["model"][name], ddp["model"][name], rtol=1e-5, atol=1e-6)
    out = tmp_path / "grid.png"
    done = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(tmp_path / "fsdp"), "--steps", "2",
                           "--num-images", "4", "--out", str(out)], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert done.returncode == 0 and Image.open(out).size == (2 * 16 + 3 * 2,) * 2, done.stderr[-2000:]


@pytest.mark.slow
def test_fsdp_needs_several_processes(tmp_path):
    proc = run([*TINY, "--fsdp", "--run-dir", tmp_path / "r"], tmp_path)
    assert proc.returncode == 2 and "torchrun" in error_line(proc) and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------------
# It learns

# Eq. 4-5 written out again in numpy: the cosine logSNR, clipped to [-15, 15] by mapping t into [A, B],
# shifted by 2 log(64 / d), and its derivative in t.
A, B = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))


def logsnr_np(t, res):
    return -2 * np.log(np.tan(A + t * (B - A))) + 2 * math.log(64 / res)


def weight_np(t, res, weighting, bias):
    """Per-t loss weight in eps space: 1, or Kingma & Gao's -dlogsnr/dt * sigmoid(b - logsnr)."""
    if weighting == "eps":
        return np.ones_like(t)
    u = A + t * (B - A)
    return 2 * (B - A) / (np.sin(u) * np.cos(u)) / (1 + np.exp(logsnr_np(t, res) - bias))


def linear_denoiser_loss(t, res, weighting, bias, m2, c_fn) -> float:
    """Expected weighted eps-MSE of x_pred = c z_t (per pixel, x and eps independent, E x^2 = m2):
    eps_pred = (z_t - alpha x_pred) / sigma, so eps - eps_pred = alpha c eps - (1 - alpha c)(alpha / sigma) x
    and E(...)^2 = (alpha c)^2 + (1 - alpha c)^2 alpha^2 m2 / sigma^2; averaged over t (midpoint rule)."""
    alpha2 = 1 / (1 + np.exp(-logsnr_np(t, res)))
    ac = np.sqrt(alpha2) * c_fn(alpha2)
    per_t = ac**2 + (1 - ac) ** 2 * alpha2 * m2 / (1 - alpha2)
    return float(np.mean(weight_np(t, res, weighting, bias) * per_t))


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["sigmoid", "eps"])
def test_it_learns(tmp_path, weighting):
    """300 steps of the tiny preset on built-in scenes, with the default sigmoid objective and the paper's
    eps loss, each scored by its own weighted eps-MSE on fixed draws of held-out scenes. References, none
    taken from this code's output:
    - L0, the loss of v_pred = 0 (the zero-initialised U-Net), in closed form; the fresh net must match it;
    - the best scalar shrinkage x_pred = c z_t, c = alpha m2 / (alpha^2 m2 + sigma^2), in closed form: what a
      network that only learnt the images' power can reach (~0.8 L0 here). The trained net must beat it;
    - the stationary Gaussian (Fourier Wiener) denoiser, computed from the training scenes' spectrum: the
      best any linear filter reaches. The trained net must come within 25% of it (it is about level with it
      after these 300 steps: shapes' sharp edges are beyond a linear filter, but 300 steps are few).
    A constant LR (--cooldown 0) keeps the run independent of the demo's LR decay."""
    res, steps = 16, 300
    run_dir = tmp_path / "r"
    proc = run(["--res", res, "--num-scenes", "512", "--batch-size", "32", "--steps", steps, "--lr", "5e-3",
                "--weighting", weighting, "--no-class-cond", "--cooldown", "0",
                "--warmup", "20", "--log-every", "50", "--ckpt-every", "0", "--sample-every", "0",
                "--num-samples", "4", "--sample-steps", "2", "--run-dir", run_dir], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load(run_dir / f"ckpt_{steps:08d}.pt")
    assert ckpt["config"]["preset"] == "tiny" and ckpt["config"]["weighting"] == weighting
    bias = ckpt["config"]["sigmoid_bias"]

    dataset = scenes.Scenes(512, res)                                     # the scenes train.py trained on
    train_x = torch.stack([dataset[i][0] for i in range(256)])           # (256, 3, res, res)
    x = torch.stack([dataset[i][0] for i in range(256, 512)])            # held out from the statistics
    m2, grid = float(x.square().mean()), (np.arange(200_000) + 0.5) / 200_000
    l0 = linear_denoiser_loss(grid, res, weighting, bias, m2, np.sqrt)  # c = alpha: x_pred = alpha z_t <=> v = 0
    l_scalar = linear_denoiser_loss(grid, res, weighting, bias, m2, lambda a2: np.sqrt(a2) * m2 / (a2 * m2 + 1 - a2))

    # Fixed draws: stratified t (one per image) and eps.
    gen = torch.Generator().manual_seed(123)
    t = (torch.arange(256) + torch.rand(256, generator=gen)) / 256
    eps = torch.randn(x.shape, generator=gen)
    logsnr = torch.from_numpy(logsnr_np(t.double().numpy(), res)).float()
    w = torch.from_numpy(weight_np(t.double().numpy(), res, weighting, bias)).float()
    alpha = torch.sigmoid(logsnr).sqrt()[:, None, None, None]
    sigma = torch.sigmoid(-logsnr).sqrt()[:, None, None, None]
    z_t = alpha * x + sigma * eps

    def loss(eps_pred):
        return float(((eps - eps_pred).square().mean(dim=(1, 2, 3)) * w).mean())

    def net_loss(net):
        with torch.no_grad():
            return loss(sigma * z_t + alpha * net(z_t, logsnr))          # eps from v (Appendix)

    fresh = checkpoint.build_model("unet", ckpt["model_config"]).eval()
    trained = checkpoint.build_model("unet", ckpt["model_config"]).eval()
    trained.load_state_dict(ckpt["model"])
    wiener = loss((z_t - alpha * fourier_wiener_x_pred(z_t, alpha, sigma, train_x)) / sigma)
    assert abs(net_loss(fresh) - l0) < 0.03 * l0           # the closed form describes the untrained net
    assert l_scalar < 0.9 * l0 and wiener < l_scalar       # the references are ordered as theory says
    assert net_loss(trained) < l_scalar and net_loss(trained) < 1.25 * wiener


@pytest.mark.slow
def test_a_skipped_step_changes_nothing(tmp_path):
    """The skip happens on the device (fused AdamW's found_inf) and the host hears of it a step later: with
    lr 1e30 step 1 is finite and steps 2 and 3 are not, so the checkpoints of steps 2 and 3 must hold the
    same finite weights and AdamW state, AdamW must have counted one update, and both skipped steps are
    reported (the last one after the loop)."""
    run_dir = tmp_path / "r"
    proc = run([*TINY, "--steps", "3", "--lr", "1e30", "--warmup", "0", "--ckpt-every", "1", "--run-dir", run_dir],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("step skipped") == 2 and "step 2:" in proc.stderr and "step 3:" in proc.stderr
    c2, c3 = load(run_dir / "ckpt_00000002.pt"), load(run_dir / "ckpt_00000003.pt")
    assert all(v.isfinite().all() for v in c3["model"].values())
    assert same_tensors(c2["model"], c3["model"])
    s2, s3 = c2["optimizer"]["state"], c3["optimizer"]["state"]
    assert all(same_tensors(s2[k], s3[k]) for k in s2)                  # step counts and both moments
    assert {float(v["step"]) for v in s3.values()} == {1.0}             # only step 1 was taken


# ----------------------------------------------------------------------------------------------------
# Small pieces in closed form

def test_ema_warmup_and_lr_in_closed_form():
    # With the model held at theta, k updates of constant decay d give ema = theta + d^k (ema_0 - theta).
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in ema.parameters()]
    for _ in range(7):
        train.ema_update(ema, model, 0.8)
    for e, p, e0 in zip(ema.parameters(), model.parameters(), start):
        torch.testing.assert_close(e, p + 0.8**7 * (e0 - p))
    assert train.ema_decay_at(0, 0.999) == 0.1 and train.ema_decay_at(10**6, 0.999) == 0.999
    # Warm-up over 4 steps, constant, then down to 0 at step 10 over the last 0.4 x 10 = 4 steps.
    cfg = train.TrainConfig(lr=1e-3, warmup=4, steps=10, cooldown=0.4)
    expected = [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4]
    assert [train.lr_at(s, cfg) for s in range(10)] == pytest.approx(expected, rel=1e-12)
    constant = train.TrainConfig(lr=1e-3, warmup=0, steps=10, cooldown=0.0)
    assert [train.lr_at(s, constant) for s in range(10)] == [1e-3] * 10


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch):
    # A machine where torch.compile cannot build kernels: the compiled callable raises on its first call.
    # The run must warn once, redo that step eagerly with the same draws, and end where --no-compile ends.
    def broken_compile(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("inductor: no C++ compiler found")
        return call
    args = [*TINY, "--steps", "2", "--ckpt-every", "0"]
    eager, _ = train.main([*args, "--no-compile", "--run-dir", str(tmp_path / "eager")])
    monkeypatch.setattr(torch, "compile", broken_compile)
    messages = []
    monkeypatch.setattr(train.tqdm, "write", lambda msg, **kw: messages.append(msg))
    fallback, _ = train.main([*args, "--compile", "--run-dir", str(tmp_path / "compiled")])
    warnings = [m for m in messages if "torch.compile failed" in m]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0]
    torch.testing.assert_close(fallback.state_dict(), eager.state_dict(), rtol=0, atol=0)


@pytest.mark.slow
def test_memory_plan_cli(tmp_path):
    """--plan allocates nothing and writes nothing; --json gives the documented keys; the preset's own
    defaults fit 8 x 80 GB (the U-ViT rows turn activation checkpointing on for that); a bad preset is one
    error line, exit 2. (memory.py's numbers are checked against measured peaks in tests/test_memory.py.)"""
    proc = run(["--res", "256", "--model", "uvit", "--plan", "--json", "--run-dir", tmp_path / "r"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    for key in ("params_gb", "grads_gb", "optimizer_gb", "ema_gb", "activations_gb", "total_gb"):
        assert isinstance(plan[key], float) and plan[key] > 0
    assert plan["fits"] is True and plan["grad_checkpointing"] is True and not (tmp_path / "r").exists()
    # The same preset without checkpointing does not fit: the row's choice is needed, not decoration.
    eager = run(["--res", "256", "--model", "uvit", "--plan", "--json", "--no-grad-checkpointing"], tmp_path)
    assert json.loads(eager.stdout)["fits"] is False
    bad = run(["--plan", "--preset", "nope"], tmp_path)
    assert bad.returncode == 2 and "not a unet preset" in error_line(bad)


@pytest.mark.slow
def test_ema_and_learning_rate_reach_training(tmp_path):
    """The EMA and the LR schedule as training applies them, against the docstring's formulas evaluated
    here: ema_1 = b0 init + (1 - b0) theta_1, ema_2 = b1 ema_1 + (1 - b1) theta_2 with b_n = (1 + n)/(10 + n)
    (below --ema-decay), and lr_n = lr min(1, (n + 1)/warmup, (N - n)/(f N)) in log.jsonl and in AdamW."""
    args = [*TINY, "--steps", "2", "--ckpt-every", "1", "--warmup", "4", "--cooldown", "0.5", "--lr", "1e-3",
            "--run-dir", tmp_path / "r"]
    assert run(args, tmp_path).returncode == 0
    c1, c2 = load(tmp_path / "r" / "ckpt_00000001.pt"), load(tmp_path / "r" / "ckpt_00000002.pt")
    torch.manual_seed(0)                                                  # --seed: the initial weights
    init = checkpoint.build_model("unet", c1["model_config"]).state_dict()
    b0, b1 = 1 / 10, 2 / 11
    for k in init:
        torch.testing.assert_close(c1["ema"][k], b0 * init[k] + (1 - b0) * c1["model"][k])
        torch.testing.assert_close(c2["ema"][k], b1 * c1["ema"][k] + (1 - b1) * c2["model"][k])
    assert not torch.equal(c2["ema"]["head.2.weight"], c2["model"]["head.2.weight"])   # an average, not a copy
    records = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    expected = {1: 1e-3 * min(1, 1 / 4, 2 / 1), 2: 1e-3 * min(1, 2 / 4, 1 / 1)}   # record of step s: lr_{s-1}
    assert {r["step"]: r["lr"] for r in records} == pytest.approx(expected, rel=1e-12)
    assert [g["lr"] for g in c2["optimizer"]["param_groups"]] == pytest.approx([expected[2]], rel=1e-12)


def full_batch_problem():
    """A 16 px network with every parameter live (the zero-initialised output convs perturbed) and one batch
    of 8 with its t and eps, all seeded: the same numbers in every process that calls it."""
    torch.manual_seed(0)
    cfg = train.resolve_config(["--res", "16", "--weighting", "eps"])
    net = checkpoint.build_model("unet", dataclasses.asdict(train.model_config(cfg, num_classes=0)))
    for p in net.parameters():   # leave the zero initialisation, so every parameter gets a gradient
        p.data.add_(0.02 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1                          # (B, C, H, W)
    t, eps = torch.rand(8, generator=gen), torch.randn(8, 3, 16, 16, generator=gen)
    return cfg, net, (x, None, t, eps), train.get_schedule("shifted", 16)


def images(batch: tuple, lo: int, hi: int) -> tuple:
    """Images lo..hi-1 of an (x, labels, t, eps) batch (labels may be None)."""
    return tuple(None if v is None else v[lo:hi] for v in batch)


def gradients(net, micro, schedule, cfg) -> list[torch.Tensor]:
    net.zero_grad()
    train.forward_backward(net, micro, schedule, cfg, contextlib.nullcontext())
    return [p.grad.clone() for p in net.parameters()]


def test_gradient_accumulation_equals_the_full_batch_gradient():
    """Two micro-batches of 4 accumulated by forward_backward give the gradient of one batch of 8 with the
    same images, t and eps (the loss is a mean, so each half carries weight 1/2), to float rounding."""
    cfg, net, batch, schedule = full_batch_problem()
    full = gradients(net, [batch], schedule, cfg)
    halves = [images(batch, i, i + 4) for i in (0, 4)]
    accumulated = gradients(net, halves, schedule, dataclasses.replace(cfg, grad_accum=2))
    for a, f in zip(accumulated, full):
        torch.testing.assert_close(a, f, rtol=1e-4, atol=1e-7)


DDP_HALF = """
import os, sys, torch
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import distributed
from test_train import full_batch_problem, gradients, images
rank, world, device = distributed.setup_distributed("cpu", timeout_minutes=5)
cfg, net, batch, schedule = full_batch_problem()
half = images(batch, 4 * rank, 4 * rank + 4)                      # this rank's 4 of the 8
ddp = distributed.wrap_model(net, use_compile=False, device=device)
torch.save(gradients(ddp, [half], schedule, cfg), os.path.join({out!r}, f"grad{{rank}}.pt"))
"""


@pytest.mark.slow
def test_two_process_ddp_gradient_equals_the_full_batch_gradient(tmp_path):
    """torchrun, 2 gloo ranks, each running train.forward_backward on its half of one batch through
    distributed.wrap_model (DDP): after DDP's all-reduce both ranks hold the gradient that one process
    computes on the whole batch (DDP averages over ranks, the loss averages over images)."""
    script = tmp_path / "ddp_half.py"
    script.write_text(DDP_HALF.format(repo=str(REPO), tests=str(REPO / "tests"), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg, net, batch, schedule = full_batch_problem()
    full = gradients(net, [batch], schedule, cfg)
    own_half = gradients(net, [images(batch, 0, 4)], schedule, cfg)
    assert not all(torch.allclose(h, f) for h, f in zip(own_half, full))    # the halves really differ
    for rank in (0, 1):
        for g, f in zip(load(tmp_path / f"grad{rank}.pt"), full):
            torch.testing.assert_close(g, f, rtol=1e-4, atol=1e-7)
