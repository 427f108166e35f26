"""
Tests for data.py: every way a user's image folder can be wrong, built in a temp folder (missing /
not-a-folder / empty / non-image folders, corrupt and truncated files with and without skip_bad, every
odd image mode and EXIF rotation, small and elongated images, too few images for a batch, class-folder
mistakes), the ADM resize + centre crop, hflip, PNG grids, and the CLI's exit codes.

Expected values come from outside the code under test: colours we wrote into the files (white
compositing, CMYK / 16-bit formulas worked by hand), a linear ramp that box and bicubic filters must
keep, coin flips redrawn from the same seed, and pixel values of a grid worked out by hand.
"""
import ast
import io
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (DataError, DataWarning, ImageFolder, center_crop_resize, check_batch, check_dataset,
                  find_images, hflip, load_rgb, save_grid)


def solid(path, colour=(200, 30, 40), size=(40, 40), mode="RGB", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def png16(path, arr):
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB): arr (H, W, C) uint16, C in 1..4."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def pixel(path):
    return load_rgb(path).getpixel((0, 0))


# ------------------------------------------------------------------------- folders and files

def test_missing_not_a_folder_and_no_images_name_path_and_extensions(tmp_path):
    for bad in (tmp_path / "nope", solid(tmp_path / "a.png")):
        with pytest.raises(DataError, match=re.escape(str(bad)) + ".*jpg, .jpeg, .png, .webp, .bmp"):
            find_images(bad)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not an image")
    solid(tmp_path / "empty" / ".hidden" / "x.png")  # hidden folders are not searched
    for call in (lambda: check_dataset(tmp_path / "empty", 16), lambda: ImageFolder(tmp_path / "empty", 16)):
        with pytest.raises(DataError, match="no images found.*jpg"):
            call()


def test_recursive_any_case_sorted_hidden_skipped(tmp_path):
    names = ["b/deep/x.JPG", "a.PnG", "b/y.jpeg", "c.webp", "d.BMP", "b/z.png"]
    for n in names:
        solid(tmp_path / n, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(n.rsplit(".", 1)[1].lower()))
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "._a.png").write_bytes(b"macOS resource fork, not an image")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == sorted(names)


def test_corrupt_and_truncated_files_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")):
        buf = io.BytesIO()
        noise.save(buf, fmt)
        path = tmp_path / f"cut.{ext}"
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
        with pytest.raises(DataError, match=f"cut.{ext}.*cannot read"):
            load_rgb(path)
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    with pytest.raises(DataError, match="text.jpg"):
        load_rgb(tmp_path / "text.jpg")
    for p in list(tmp_path.iterdir()):  # the check pass reports the first bad file and how many
        p.rename(tmp_path / ("bad_" + p.name))
    solid(tmp_path / "good.png")
    with pytest.raises(DataError, match=r"bad_cut.bmp.*and 4 more"):
        check_dataset(tmp_path, 16)


def test_skip_bad_warns_counts_and_excludes(tmp_path):
    for i in range(4):
        solid(tmp_path / f"ok{i}.png", colour=(10 * i, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(DataWarning, match="skipped 1 unreadable.*broken.png"):
        summary = check_dataset(tmp_path, 16, skip_bad=True)
    assert summary["bad_files"] == ["broken.png"] and summary["num_images"] == 4 and summary["num_files"] == 5
    ds = ImageFolder(tmp_path, 16, skip_bad=True, bad_files=summary["bad_files"])
    assert len(ds) == 4 and all(ds[i][0].shape == (3, 16, 16) for i in range(4))
    # Without the summary, a bad file met during training is replaced by the next one, with a warning ...
    ds = ImageFolder(tmp_path, 16, skip_bad=True)
    assert ds.paths[0].name == "broken.png"
    with pytest.warns(DataWarning, match="broken.png"):
        x, _ = ds[0]
    assert torch.equal(x, ds[1][0])
    # ... and without skip_bad it is an error naming the file.
    with pytest.raises(DataError, match="broken.png"):
        ImageFolder(tmp_path, 16)[0]


def test_odd_modes_become_rgb_deterministically(tmp_path):
    assert pixel(solid(tmp_path / "l.png", 77, mode="L")) == (77, 77, 77)
    assert pixel(solid(tmp_path / "1.png", 1, mode="1")) == (255, 255, 255)
    # Transparency is composited on white: out = a * c + (1 - a) * 255.
    assert pixel(solid(tmp_path / "clear.png", (255, 0, 0, 0), mode="RGBA")) == (255, 255, 255)
    assert pixel(solid(tmp_path / "half.png", (0, 0, 0, 128), mode="RGBA")) == (127, 127, 127)
    assert pixel(solid(tmp_path / "la.png", (0, 51), mode="LA")) == (204, 204, 204)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert pixel(tmp_path / "p.png") == (12, 34, 56)
    pal.save(tmp_path / "p_clear.png", transparency=1)  # palette entry 1 marked transparent
    assert pixel(tmp_path / "p_clear.png") == (255, 255, 255)
    # CMYK: R = (255 - C)(255 - K) / 255 (Pillow's plain formula, no ICC): cyan -> (0, 255, 255).
    cyan = solid(tmp_path / "cmyk.jpg", (255, 0, 0, 0), mode="CMYK", quality=100)
    assert pixel(cyan) == pytest.approx((0, 255, 255), abs=3)
    grey = solid(tmp_path / "k.jpg", (0, 0, 0, 102), mode="CMYK", quality=100)  # 255 * (1 - 0.4) = 153
    assert pixel(grey) == pytest.approx((153, 153, 153), abs=3)
    # 16-bit: the high byte, for grayscale (mode I;16) and RGB alike (Pillow's own 16-bit RGB rule).
    g16 = np.array([[0x0000, 0x80FF], [0xFFFF, 0x1234]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "g16.png"))[..., 0], g16 >> 8)
    rgb16 = np.broadcast_to(np.array([0x80FF, 0xFFFF, 0x00FF], np.uint16), (2, 2, 3))
    rgb16 = png16(tmp_path / "rgb16.png", rgb16)
    assert pixel(rgb16) == (0x80, 0xFF, 0x00)
    g16_as_file = png16(tmp_path / "g16b.png", g16[..., None])
    assert np.array_equal(np.asarray(load_rgb(g16_as_file))[..., 1], g16 >> 8)
    for p in tmp_path.iterdir():  # every result is 8-bit RGB, and loading twice gives the same bytes
        a, b = load_rgb(p), load_rgb(p)
        assert a.mode == "RGB" and a.tobytes() == b.tobytes()
    with pytest.warns(DataWarning):  # everything here is smaller than res; the summary counts modes
        summary = check_dataset(tmp_path, 16)
    assert summary["modes"]["I;16"] == 2 and summary["modes"]["CMYK"] == 2 and summary["num_images"] == 12


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (32, 16), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: display rotated 90 degrees clockwise -> the left half goes on top
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = np.asarray(load_rgb(tmp_path / "rot.jpg")).astype(int)
    assert out.shape == (32, 16, 3)  # (H, W, 3): portrait now
    assert np.abs(out[4, 8] - [255, 0, 0]).max() < 20 and np.abs(out[27, 8] - [0, 0, 255]).max() < 20


# ------------------------------------------------------------------------- sizes, crops, tensors

def test_center_crop_resize_keeps_the_centre(tmp_path):
    img = Image.new("RGB", (256, 128), (0, 255, 0))  # wide: red left quarter, blue right quarter
    img.paste((255, 0, 0), (0, 0, 64, 128))
    img.paste((0, 0, 255), (192, 0, 256, 128))
    out = center_crop_resize(img, 32)  # box 256x128 -> 128x64 -> 64x32, then bicubic (identity here)
    assert out.size == (32, 32) and np.all(np.asarray(out) == [0, 255, 0])
    tall = center_crop_resize(Image.new("RGB", (10, 31), (9, 99, 199)), 24)  # upscale of a small image
    assert tall.size == (24, 24) and np.abs(np.asarray(tall).astype(int) - [9, 99, 199]).max() <= 1
    # Box-halving then bicubic of a linear ramp stays that ramp (both filters are symmetric):
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1))).convert("RGB")
    out = np.asarray(center_crop_resize(ramp, 64))[..., 0].astype(float)
    assert np.abs(out[32, 4:-4] - (np.arange(64) * 4 + 1.5)[4:-4]).max() <= 1.0


def test_small_and_elongated_images_warn_with_counts(tmp_path):
    solid(tmp_path / "big.png", size=(64, 64))
    solid(tmp_path / "small1.png", size=(20, 40))
    solid(tmp_path / "small2.png", size=(31, 31))
    solid(tmp_path / "long.png", size=(200, 40))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = check_dataset(tmp_path, 32)
    text = " | ".join(str(w.message) for w in caught)
    assert "2 of 4 images are smaller than 32" in text and "1 of 4 images are more than 2x" in text
    assert summary["num_small"] == 2 and summary["num_elongated"] == 1 and summary["warnings"]
    ds = ImageFolder(tmp_path, 32)
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and label == 0


def test_tensor_range_is_exact(tmp_path):
    img = Image.new("RGB", (16, 16), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 16, 8))
    img.save(tmp_path / "bw.png")
    x, _ = ImageFolder(tmp_path, 16)[0]
    assert torch.all(x[:, :8] == 1.0) and torch.all(x[:, 8:] == -1.0)


def test_fewer_images_than_a_global_batch(tmp_path):
    for i in range(5):
        solid(tmp_path / f"{i}.png")
    assert check_dataset(tmp_path, 16, min_images=5)["num_images"] == 5
    with pytest.raises(DataError, match="5 images, fewer than one global batch of 8"):
        check_dataset(tmp_path, 16, min_images=8)
    with pytest.raises(DataError, match="fewer than one global batch of 64"):
        check_batch(10, 64, "--num-scenes")


# ------------------------------------------------------------------------- class folders

def test_class_labels_from_sorted_first_level_folders(tmp_path):
    for cls, n in (("zebra", 2), ("ant", 1), ("cat", 3)):
        for i in range(n):
            solid(tmp_path / cls / "nested" / f"{i}.png", colour=(i, 0, 0))
    summary = check_dataset(tmp_path, 8, class_cond=True)
    assert summary["class_names"] == ["ant", "cat", "zebra"] and summary["class_counts"] == [1, 3, 2]
    ds = ImageFolder(tmp_path, 8, class_cond=True)
    got = sorted((p.relative_to(tmp_path).parts[0], ds[i][1]) for i, p in enumerate(ds.paths))
    assert set(got) == {("ant", 0), ("cat", 1), ("zebra", 2)} and len(got) == 6
    plain = ImageFolder(tmp_path, 8)
    assert plain.class_names is None and {plain[i][1] for i in range(6)} == {0}


def test_class_folder_errors_list_classes_and_counts(tmp_path):
    solid(tmp_path / "a" / "1.png")
    with pytest.raises(DataError, match=r"at least 2 class folders, found 1 \(a: 1\)"):
        check_dataset(tmp_path, 8, class_cond=True)
    (tmp_path / "b_empty").mkdir()
    (tmp_path / "b_empty" / "notes.txt").write_text("x")
    solid(tmp_path / "c" / "1.png")
    for call in (lambda: check_dataset(tmp_path, 8, class_cond=True),
                 lambda: ImageFolder(tmp_path, 8, class_cond=True)):
        with pytest.raises(DataError, match=r"empty class folders b_empty.*a: 1, b_empty: 0, c: 1"):
            call()
    (tmp_path / "b_empty" / "1.png").write_bytes(b"corrupt")  # a class that only becomes empty when skipping
    with pytest.warns(DataWarning), pytest.raises(DataError, match="empty class folders b_empty"):
        check_dataset(tmp_path, 8, class_cond=True, skip_bad=True)
    solid(tmp_path / "loose.png")
    with pytest.raises(DataError, match="directly in the folder"):
        check_dataset(tmp_path, 8, class_cond=True)


# ------------------------------------------------------------------------- hflip

def test_hflip_flips_exactly_the_drawn_examples():
    x = torch.randn(64, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    expect = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5  # the documented draw
    y = hflip(x, g)
    mirrored = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(64)])
    same = torch.tensor([torch.equal(y[i], x[i]) for i in range(64)])
    assert torch.equal(mirrored, expect) and torch.equal(same, ~expect)
    assert 16 < int(expect.sum()) < 48  # about half
    assert torch.equal(y[:, :, :, 0], torch.where(expect[:, None, None], x[:, :, :, -1], x[:, :, :, 0]))
    again = hflip(x, torch.Generator().manual_seed(3))
    assert torch.equal(again, y) and not torch.equal(hflip(x, g), y)  # replayable; the generator advances


# ------------------------------------------------------------------------- PNG grids

def test_save_grid_layout_and_quantisation(tmp_path):
    values = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0])
    images = values.view(5, 1, 1, 1).expand(5, 3, 4, 6).clone()
    save_grid(images, tmp_path / "g.png", nrow=3, padding=2)
    grid = np.array(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3) and not list(tmp_path.glob("*.tmp*"))
    expected = [0, 64, 128, 255, 255]          # round((v + 1) * 127.5): -0.5 -> 63.75 -> 64, 0 -> 127.5 -> 128
    for i, e in enumerate(expected):
        y, x = 2 + (i // 3) * 6, 2 + (i % 3) * 8
        assert (grid[y:y + 4, x:x + 6] == e).all(), i
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()


# ------------------------------------------------------------------------- the command line

def test_cli_checks_a_folder_and_exits_2_on_bad_data(tmp_path, capsys):
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        solid(tmp_path / "imgs" / f"{i}.png", colour=colour, size=(20, 20))
    assert data.main(["--data", str(tmp_path / "imgs"), "--res", "8", "--out", str(tmp_path / "g.png")]) == 0
    grid = np.array(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 + 10, 2 + 2 * 10, 3)  # one row of ceil(sqrt(2)) = 2 images, 8 px + 2 padding
    assert (grid[2:10, 2:10] == [255, 0, 0]).all() and (grid[2:10, 12:20] == [0, 0, 255]).all()
    assert data.main(["--data", str(tmp_path / "missing")]) == data.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "missing: no such folder" in err
    with pytest.raises(SystemExit) as e:  # --data is required: argparse's usage error
        data.main([])
    assert e.value.code == data.EXIT_USAGE


def test_data_does_not_import_the_scenes_chapter():
    """Imports only go down: scenes.py builds on data.py, never the reverse."""
    tree = ast.parse(Path(data.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "scenes" not in imported and "numpy" in imported  # the second: the walk does see imports


def test_check_split_across_ranks_equals_one_process_and_is_cached(tmp_path, monkeypatch):
    """Two ranks each decode half the files; with their results gathered (here by running both shares
    in this process) every rank reaches the single-process verdict. The cached verdict is reused while
    the listing is unchanged (no file is decoded again) and recomputed when a file changes."""
    root = tmp_path / "imgs"
    for i in range(5):
        solid(root / f"ok{i}.png", colour=(10 * i, 0, 0), size=(8 + i, 8))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(DataWarning):
        one = check_dataset(root, 16, skip_bad=True)
    shares = {}
    def gather(results):   # what all_gather_object returns: every rank's list, in rank order
        return [shares[r] for r in range(2)]
    import data
    for rank in (1, 0):    # each rank's share, decoded as check_dataset decodes it
        shares[rank] = [data._inspect(p, 16, True) for p in data.find_images(root)[rank::2]]
    with pytest.warns(DataWarning):
        split = check_dataset(root, 16, skip_bad=True, share=(0, 2), gather=gather)
    assert split == one
    cache = tmp_path / "check.json"
    with pytest.warns(DataWarning):
        assert check_dataset(root, 16, skip_bad=True, cache=cache) == one
    monkeypatch.setattr(data, "_inspect", lambda *a: pytest.fail("decoded again despite the cache"))
    with pytest.warns(DataWarning):
        assert check_dataset(root, 16, skip_bad=True, cache=cache) == one
    solid(root / "ok9.png", colour=(1, 2, 3))                          # the listing changes: recomputed
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        check_dataset(root, 16, skip_bad=True, cache=cache)
