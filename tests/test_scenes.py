"""
Tests for scenes.py: the procedural scenes (deterministic random access, one picture at every
resolution, labels that match the drawn shape, the stated distributions) and the shape score (a
classifier right on held-out scenes at 32, 64 and 128 px, cached after its first training, and a score
that falls to chance or below when the labels are wrong).

Expected values come from outside the code under test: geometry of the shapes (area over
enclosing-circle area is 1 for a disc, 2/pi for a square, 3 sqrt(3) / (4 pi) for a triangle), a second
route for resolution independence (render at 128, average-pool by 4, compare with the 32x32 render),
binomial error bars, scores and confusion matrices counted by hand, and the shape kinds the scene
generator drew (themselves checked against geometry here) for scenes the classifier never trained on.
The classifier is trained once per session into a temp cache (about a minute: marked slow).
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import scenes
from scenes import (CLASSIFIER_SEED, N_SHAPES_P, RECIPE, SIZE_RANGE, Scenes, render_scenes, scene_kinds,
                    scene_params, shape_classifier, shape_score, train_shape_classifier)

HELD_OUT_SEED = CLASSIFIER_SEED + 1  # neither the classifier's (1) nor the diffusion demo's (0) scenes


# ------------------------------------------------------------------------- procedural scenes

def test_scenes_items_are_deterministic_and_random_access():
    a, b = Scenes(40, 16, seed=1), Scenes(40, 16, seed=1)
    assert torch.equal(a.images, b.images)
    x, label = a[7]
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and label == 0 and a.class_names is None
    assert x.min() >= -1 and x.max() <= 1
    small, lazy = Scenes(10, 16, seed=1), Scenes(40, 16, seed=1, cache=False)  # other n, no cache
    assert lazy.images is None
    for i in (0, 7, 9):
        assert torch.equal(small[i][0], a[i][0]) and torch.equal(lazy[i][0], a[i][0])
    assert not torch.equal(Scenes(40, 16, seed=2).images, a.images)
    assert len({a.images[i].float().mean().item() for i in range(40)}) == 40  # scenes differ


def test_scenes_are_the_same_picture_at_every_resolution():
    """Vector-defined: pool a 128x128 render by 4 and it is the 32x32 render (edges to AA accuracy)."""
    idx = np.arange(24)
    lo = torch.from_numpy(render_scenes(idx, 32)).float() / 255
    hi = torch.from_numpy(render_scenes(idx, 128)).float() / 255
    diff = (F.avg_pool2d(hi, 4) - lo).abs()                                 # (B, 3, 32, 32)
    assert diff.mean() < 0.003 and torch.quantile(diff.flatten(), 0.99) < 0.04
    other = (F.avg_pool2d(hi.roll(1, 0), 4) - lo).abs()  # the control: a different scene is far away
    assert other.mean() > 20 * diff.mean()


def test_class_label_is_the_drawn_shape():
    """For one-shape scenes, measure the shape: area / (pi * max radius^2) is 1 for a disc, 2/pi = 0.64
    for a square, 3 sqrt(3) / (4 pi) = 0.41 for a triangle. The background is planar, so its four
    corners (never covered) give it without reading the scene parameters."""
    ds = Scenes(200, 96, class_cond=True)
    assert ds.class_names == ["disc", "square", "triangle"]
    single = np.flatnonzero(scene_params(np.arange(200))["n_shapes"] == 1)[:36]
    assert len(single) >= 30
    yy, xx = np.mgrid[0:96, 0:96].astype(float)                             # pixel units
    design = np.stack([np.ones(4), [0, 95, 0, 95], [0, 0, 95, 95]], 1)      # corners (1, x, y)
    seen = set()
    for i in single:
        x, label = ds[int(i)]
        img = (x.numpy() + 1) / 2                                           # (3, H, W) in [0, 1]
        corners = img[:, [0, 0, -1, -1], [0, -1, 0, -1]].T                  # (4, 3)
        coef = np.linalg.lstsq(design, corners, rcond=None)[0]              # (3 terms, 3 channels)
        bg = coef[0][:, None, None] + coef[1][:, None, None] * xx + coef[2][:, None, None] * yy
        mask = np.linalg.norm(img - bg, axis=0) > 0.2                       # contrast is >= 0.45
        cy, cx = yy[mask].mean(), xx[mask].mean()
        r2 = ((yy[mask] - cy) ** 2 + (xx[mask] - cx) ** 2).max()
        ratio = mask.sum() / (np.pi * r2)
        measured = 0 if ratio > 0.82 else 1 if ratio > 0.52 else 2
        assert measured == label, (int(i), ratio, label)
        seen.add(label)
    assert seen == {0, 1, 2}
    counts = np.bincount(ds.kinds.numpy(), minlength=3)
    assert counts.min() > 40  # the three classes are roughly balanced (200 / 3 each)


def test_scene_counts_and_sizes_follow_the_stated_distribution():
    """n_shapes ~ N_SHAPES_P and size ~ U(SIZE_RANGE): empirical frequencies of 20,000 scenes within
    4 binomial standard deviations of the stated probabilities, and sizes inside the stated range."""
    n = 20000
    p = scene_params(np.arange(n))
    freq = np.bincount(p["n_shapes"], minlength=len(N_SHAPES_P) + 1)[1:] / n
    expected = np.asarray(N_SHAPES_P)
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / n))
    lo, hi = SIZE_RANGE
    assert p["size"].min() >= lo and p["size"].max() <= hi
    assert np.mean(p["size"] < (lo + hi) / 2) == pytest.approx(0.5, abs=4 * 0.5 / np.sqrt(p["size"].size))


def test_demo_cli_writes_a_grid_and_exits_2_on_bad_input(tmp_path, capsys):
    assert scenes.main(["--res", "16", "--n", "5", "--out", str(tmp_path / "s.png")]) == 0
    grid = np.array(Image.open(tmp_path / "s.png"))
    assert grid.shape == (2 + 2 * 18, 2 + 3 * 18, 3)  # ceil(sqrt(5)) = 3 per row, 2 rows, 16 + 2 padding
    assert np.array_equal(grid[2:18, 2:18], render_scenes([0], 16)[0].transpose(1, 2, 0))
    assert scenes.main(["--res", "0", "--out", str(tmp_path / "t.png")]) == 2
    assert "error: Scenes needs" in capsys.readouterr().err and not (tmp_path / "t.png").exists()


# ------------------------------------------------------------------------- the shape score

class _Oracle(nn.Module):
    """A stand-in classifier that predicts the kind written in pixel (0, 0, 0): -1 -> 0, 0 -> 1, 1 -> 2."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return F.one_hot((x[:, 0, 0, 0].round() + 1).long(), 3).float() + self.dummy


def test_score_bookkeeping_against_hand_counts():
    predicted, asked = [0, 1, 2, 2, 0, 1], [0, 1, 1, 2, 2, 1]
    images = torch.zeros(6, 3, 8, 8)
    images[:, 0, 0, 0] = torch.tensor(predicted, dtype=torch.float32) - 1
    got = shape_score(images, asked, _Oracle())
    assert got["n"] == 6 and got["score"] == pytest.approx(4 / 6)   # right: images 0, 1, 3, 5
    assert got["per_kind"] == pytest.approx({"disc": 1.0, "square": 2 / 3, "triangle": 0.5})
    assert got["confusion"] == [[1, 0, 0], [0, 2, 1], [1, 0, 1]]     # rows asked, columns predicted
    u8 = ((images + 1) * 127.5).round().to(torch.uint8)              # the same images as uint8
    assert shape_score(u8, torch.tensor(asked), _Oracle()) == got
    only_discs = shape_score(images[:1], [0], _Oracle())["per_kind"]
    assert only_discs["square"] is None and only_discs["triangle"] is None
    for bad_labels, match in (([0, 1], "6 images but 2 labels"), ([0, 1, 2, 3, 0, 0], "labels must be 0..2")):
        with pytest.raises(ValueError, match=match):
            shape_score(images, bad_labels, _Oracle())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        shape_score(images[:, :1], asked, _Oracle())


def test_training_is_seeded_and_leaves_the_callers_rng_alone():
    tiny = dict(RECIPE, num_scenes=32, steps=3, batch=8)
    torch.manual_seed(123)
    a = train_shape_classifier(tiny, log=lambda msg: None)
    after = torch.rand(3)
    torch.manual_seed(456)
    b = train_shape_classifier(tiny, log=lambda msg: None)
    assert torch.equal(after, torch.rand(3, generator=torch.Generator().manual_seed(123)))  # RNG not advanced
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    fresh = scenes.ShapeClassifier()
    assert not torch.equal(a.head.weight, fresh.head.weight)  # it did train


def test_stale_or_corrupt_cache_is_rebuilt_then_reused(tmp_path, monkeypatch):
    calls = []

    def fake_training(recipe=RECIPE, log=print):
        calls.append(1)
        torch.manual_seed(len(calls))
        return scenes.ShapeClassifier().eval()

    monkeypatch.setattr(scenes, "train_shape_classifier", fake_training)
    path = tmp_path / scenes.CACHE_NAME
    path.write_bytes(b"not a torch file")
    logs = []
    first = shape_classifier(tmp_path, log=logs.append)
    assert len(calls) == 1 and "ignoring unreadable" in logs[0]
    torch.save({"key": "another recipe", "state_dict": first.state_dict()}, path)
    second = shape_classifier(tmp_path, log=logs.append)
    assert len(calls) == 2 and not torch.equal(second.head.weight, first.head.weight)
    third = shape_classifier(tmp_path, log=logs.append)
    assert len(calls) == 2 and torch.equal(third.head.weight, second.head.weight)
    assert not third.training and not any(p.requires_grad for p in third.parameters())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The real classifier, trained once into a temp cache dir: (classifier, cache_dir)."""
    cache = tmp_path_factory.mktemp("classifier_cache")
    return shape_classifier(cache), cache


def _held_out(res: int, n: int = 600):
    idx = np.arange(n)
    return torch.from_numpy(render_scenes(idx, res, HELD_OUT_SEED)), scene_kinds(idx, HELD_OUT_SEED)


@pytest.mark.slow
@pytest.mark.parametrize("res", [32, 64, 128])
def test_classifier_names_held_out_scenes_at_every_resolution(trained, res):
    images, kinds = _held_out(res)
    got = shape_score(images, kinds, trained[0])
    assert got["score"] >= 0.95, got
    assert min(got["per_kind"].values()) >= 0.9, got  # no kind is sacrificed for the others


@pytest.mark.slow
def test_second_call_loads_the_cache_instead_of_training(trained, monkeypatch):
    classifier, cache = trained
    assert (cache / scenes.CACHE_NAME).is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache was fresh")

    monkeypatch.setattr(scenes, "train_shape_classifier", no_training)
    again = shape_classifier(cache)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again(x), classifier(x))


@pytest.mark.slow
def test_wrong_labels_score_at_chance_or_below(trained):
    images, kinds = _held_out(64)
    right = shape_score(images, kinds, trained[0])["score"]
    shifted = shape_score(images, (kinds + 1) % 3, trained[0])["score"]   # every label wrong
    rng = np.random.default_rng(0)
    shuffled = shape_score(images, rng.integers(0, 3, len(kinds)), trained[0])["score"]  # blind labels
    assert shifted <= 0.05 and right >= 0.95
    assert abs(shuffled - 1 / 3) < 4 * np.sqrt(2 / 9 / len(kinds))       # chance, within 4 standard errors
