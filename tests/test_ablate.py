"""ablate.py end to end on a tiny configuration: two arms of the schedule study at 16 px, 2 training steps,
4 samples, random Inception weights, no shape classifier. Checks the three results files, one table row per
arm, that a rerun skips finished arms (their checkpoints untouched), the study lock (a dead owner's is taken
over, a live owner's refuses), and the bad-input exits (2)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arms", "cosine", "shifted", "--res", "16", "--preset", "tiny", "--steps", "2", "--batch-size", "4",
        "--num-scenes", "8", "--num-samples", "4", "--sample-steps", "2", "--no-shape-score"]
# One thread each for torch and numpy: FID's 2048 x 2048 eigendecompositions slow down ~10x next to other jobs.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "OMP_WAIT_POLICY": "PASSIVE"}


def ablate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "ablate.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_schedule_study_end_to_end_resume_and_refusals(tmp_path):
    out = tmp_path / "results"
    lock = out / "runs" / "schedule.lock"
    lock.parent.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(gone.stdout.strip())                            # left by a process that has exited
    first = ablate("schedule", *TINY, "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "RANDOMLY initialised" in first.stderr                   # the loud warning
    assert not lock.exists()                                        # taken over, released at the end

    # A live owner (this test process) holds the lock: a second ablate.py refuses, touching nothing.
    lock.write_text(str(os.getpid()))
    busy = ablate("schedule", *TINY, "--out", str(out))
    assert busy.returncode == 2 and f"another ablate.py (pid {os.getpid()})" in busy.stderr
    lock.unlink()
    for ext in ("md", "json", "png"):
        assert (out / f"schedule.{ext}").is_file()
    table = [line for line in (out / "schedule.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[2:]] == ["cosine", "shifted"]   # one row per arm
    assert all(line.split("|")[8].strip() == "-" for line in table[2:])                  # no shape score
    assert "KID: subsets of 4 out of N = 4 images" in (out / "schedule.md").read_text()   # N < subset size
    rows = json.loads((out / "schedule.json").read_text())["rows"]
    assert [(r["arm"], r["status"], r["kid_subset_size"]) for r in rows] == [("cosine", "done", 4),
                                                                             ("shifted", "done", 4)]
    for r in rows:   # every arm has its sampling time and a positive ratio at each log-SNR of the check
        assert r["sample_minutes"] > 0 and len(r["denoise"]) == 3 and all(v > 0 for v in r["denoise"].values())

    # Rerun: both arms are skipped; no checkpoint is rewritten. A row scored before the denoising check
    # existed (its "denoise" removed here) gets the same numbers added.
    cosine_metrics = out / "runs" / "schedule" / "cosine-seed0" / "metrics.json"
    scored = json.loads(cosine_metrics.read_text())
    cosine_metrics.write_text(json.dumps({k: v for k, v in scored.items() if k != "denoise"}))
    ckpts = sorted((out / "runs" / "schedule").glob("*/ckpt_*.pt"))
    assert len(ckpts) == 2
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    again = ablate("schedule", *TINY, "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("finished earlier, skipped") == 2
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps
    assert json.loads(cosine_metrics.read_text())["denoise"] == pytest.approx(scored["denoise"], rel=1e-6)

    # The loss study's eps arm is the schedule study's shifted arm: copied (no checkpoint), with its scores.
    # Its multiscale arm differs in one training flag, so it trains.
    loss = ablate("loss", "--arms", "eps", "multiscale", *TINY[3:], "--out", str(out))
    assert loss.returncode == 0, loss.stderr[-2000:]
    assert loss.stderr.count(", reused") == 1
    assert not list((out / "runs" / "loss" / "eps-seed0").glob("ckpt_*.pt"))
    assert len(list((out / "runs" / "loss" / "multiscale-seed0").glob("ckpt_*.pt"))) == 1
    eps, multiscale = json.loads((out / "loss.json").read_text())["rows"]
    assert (eps["reused_from"], eps["fid"], eps["kid"]) == ("runs/schedule/shifted-seed0", rows[1]["fid"], rows[1]["kid"])
    assert "reused_from" not in multiscale
    # Sampled differently (--sample-steps 3): not the same run, so the eps arm trains.
    other = tmp_path / "other-sampler"
    shutil.copytree(out / "runs" / "schedule", other / "runs" / "schedule")
    steps3 = ablate("loss", "--arms", "eps", *TINY[3:-3], "--sample-steps", "3", "--no-shape-score", "--out", str(other))
    assert steps3.returncode == 0 and "reused" not in steps3.stderr, steps3.stderr[-2000:]
    assert len(list((other / "runs" / "loss" / "eps-seed0").glob("ckpt_*.pt"))) == 1

    # Bad inputs: one error line, exit 2, nothing overwritten.
    before = (out / "schedule.json").read_bytes()
    changed = ablate("schedule", *TINY[:-1], "--steps", "3", "--no-shape-score", "--out", str(out))
    assert changed.returncode == 2
    assert "another configuration" in changed.stderr and "steps: 2 (stored) vs 3 (now)" in changed.stderr
    assert (out / "schedule.json").read_bytes() == before
    for args, words in ((["nope"], "unknown study"), (["schedule", "--arms", "linear"], "unknown arm")):
        bad = ablate(*args, "--out", str(tmp_path / "other"))
        assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and words in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()


def arm_train_config(study: str, arm: str, run_dir: Path) -> dict:
    """train.py's resolved config (as a dict) of one arm, seed 0, with ablate.py's default flags."""
    import dataclasses
    import ablate
    import train
    _, cfg = ablate.parse([study])
    return dataclasses.asdict(train.resolve_config(ablate.train_argv(study, arm, 0, cfg, run_dir)))


@pytest.mark.parametrize("study", ["schedule", "loss", "resolution", "schedule-sigmoid"])
def test_arms_differ_only_in_the_studied_factor(study):
    """train.py's resolved configs of a study's arms agree on every field but the factor and the run folder,
    and none of them falls back on train.py's paper-scale preset rows (batch 512, 500k steps)."""
    import ablate
    factor = {k for arm in ablate.STUDIES[study]["arms"].values() for k in arm} | {"sigmoid_bias"}
    factor |= {"preset"} if "res" in factor else set()         # the resolution study: each res its own preset
    configs = [arm_train_config(study, arm, Path(arm)) for arm in ablate.STUDIES[study]["arms"]]
    for c in configs:
        assert (c["batch_size"], c["steps"], c["seed"]) == (32, 2000, 0)
        assert c["preset"] == ablate.SCENE_PRESETS[c["res"]] and c["preset"] in ("small", "small64", "small128")
        assert {k for k in c if c[k] != configs[0][k]} <= factor | {"run_dir"}
    assert len({tuple(c[k] for k in sorted(factor)) for c in configs}) == len(configs)


def test_arms_shared_between_studies_train_the_same():
    """The arms ablate.py reuses across studies are the same train.py run: the schedule study's shifted is the
    loss study's eps and the resolution study's 128, the loss study's sigmoid the schedule-sigmoid study's
    shifted; no other arms are."""
    import ablate
    runs = {}
    for study, spec in ablate.STUDIES.items():
        for arm in spec["arms"]:
            c = json.dumps(arm_train_config(study, arm, Path(".")), sort_keys=True)
            runs.setdefault(c, []).append(f"{study}/{arm}")
    shared = sorted(sorted(v) for v in runs.values() if len(v) > 1)
    assert shared == [["loss/eps", "resolution/128", "schedule/shifted"], ["loss/sigmoid", "schedule-sigmoid/shifted"]]


def test_wiener_filter_is_the_pixel_space_linear_mmse():
    """The Fourier Wiener filter against the linear MMSE estimator written in pixel space from the data's
    covariance matrix, x_hat = m + alpha C (alpha^2 C + sigma^2 I)^-1 (z_t - alpha m), per channel. The data
    are all circular shifts of two random images: their covariance is exactly circulant (stationary), so the
    two must agree to rounding; a filter that mixed frequencies or channels, or forgot the mean, would not."""
    from ablate import fourier_wiener_x_pred
    g = torch.Generator().manual_seed(0)
    base = torch.rand(2, 3, 6, 6, generator=g) * torch.tensor([1.0, 2.0, 0.5])[:, None, None] + 0.3   # (2, 3, 6, 6)
    train_x = torch.stack([b.roll((i, j), (1, 2)) for b in base for i in range(6) for j in range(6)])  # (72, 3, 6, 6)
    z_t = torch.randn(4, 3, 6, 6, generator=g)
    alpha, sigma = 0.6, 0.8
    got = fourier_wiener_x_pred(z_t, alpha, sigma, train_x).double().numpy()
    x, z = train_x.double().numpy(), z_t.double().numpy()
    for c in range(3):
        flat = x[:, c].reshape(len(x), -1)                                    # (72, 36) pixels of channel c
        m = flat.mean()                                                       # the same at every pixel
        cov = (flat - m).T @ (flat - m) / len(flat)                           # (36, 36)
        gain = alpha * cov @ np.linalg.inv(alpha**2 * cov + sigma**2 * np.eye(36))
        want = m + (z[:, c].reshape(len(z), -1) - alpha * m) @ gain.T        # (4, 36)
        np.testing.assert_allclose(got[:, c].reshape(len(z), -1), want, atol=1e-5)
