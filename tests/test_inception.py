"""
inception.py against independent references:
- Architecture: state-dict keys and shapes equal the published weights file's list (tests/data); the
  forward order of the whole graph with crafted weights (every layer outputs its own constant), so each
  Mixed block's torch.cat order and per-branch channel counts, and each layer's predecessor, are checked
  against the published Inception-v3 table written below -- no weights file needed.
- The TF-style pools (padding excluded; max pool in Mixed_7c) against numpy window loops; preprocessing
  against a hand-written bilinear resize; the uint8 quantisation rule by hand; (B, 2048) finite features
  at 32x32 and 299x299; batch-size invariance.
- Known answer: pool3 features of two synthetic images, computed once by pytorch-fid's own InceptionV3
  with numerically standard weights (tests/data/README.md), reproduced to 1e-5. Runs when FID_WEIGHTS
  names that weights file; otherwise it is skipped with a message saying how to run it.
- Weights loading: strict, with and without num_batches_tracked; missing, corrupt, foreign files; the
  offline download and a corrupt cache.
"""
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import inception

DATA = Path(__file__).resolve().parent / "data"
# sha256 of json.dumps([[key, shape], ...]) over the published key list, in file order
KEYS_SHA256 = "a7a15da1ed154b7574faa006bd5c8ac6ff96d0d5f879ca050475348d2a4368d9"


def random_inception(seed=0) -> inception.InceptionV3:
    """He-initialised convolutions and perturbed BatchNorm statistics, so every value in the state dict
    differs from PyTorch's defaults (a load that silently skipped a tensor would show) and activations
    stay O(1) through the 94 layers."""
    g = torch.Generator().manual_seed(seed)
    model = inception.InceptionV3()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.9 + 0.2 * torch.rand(c, generator=g))
                m.bias.copy_(0.05 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.05 * torch.randn(c, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(123)
        model.fc.weight.copy_(0.01 * torch.randn(model.fc.weight.shape, generator=g))
        model.fc.bias.copy_(0.01 * torch.randn(1008, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return random_inception()


def known_answer_image(size: int) -> torch.Tensor:
    """uint8 (1, 3, size, size): colour gradients and a red disc on [0, 1]^2, sampled at pixel centres.
    Only +, *, < and rounding, so every platform draws the same pixels."""
    t = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(t, t, indexing="ij")
    rgb = np.stack([x, y, (1 - x) * y + 0.25 * (1 - y)])                          # (3, H, W) in [0, 1]
    disc = (x - 0.55) ** 2 + (y - 0.45) ** 2 < 0.25 ** 2
    rgb = np.where(disc, np.array([0.9, 0.15, 0.2])[:, None, None], rgb)
    return torch.from_numpy(np.rint(rgb * 255).astype(np.uint8))[None]           # (1, 3, H, W)


# ---------------------------------------------------------------------------------------- architecture

def test_state_dict_matches_published_weights_file():
    state = inception.InceptionV3().state_dict()
    listing = [[k, list(v.shape)] for k, v in state.items()]
    published = json.loads((DATA / "fid_inception_state_dict_keys.json").read_text())["state_dict"]
    assert listing == published
    # the repository's copy of the list is still the published one
    assert hashlib.sha256(json.dumps(published).encode()).hexdigest() == KEYS_SHA256
    assert len(listing) == 566 and sum(v.numel() for v in state.values()) == 23_885_486  # ~23.9 M


# The published Inception-v3 (Szegedy et al. 2016; torchvision and pytorch-fid's FID variant): each block
# kind's branches in torch.cat order, each branch as its layers in forward order. "maxpool" is the
# convolution-free branch (a stride-2 max pool: its channels are the block's input channels). In the E
# blocks, one 1x1 layer feeds a 1x3 and a 3x1 layer whose outputs are concatenated: two chains here.
BRANCHES = {
    "A": [["branch1x1"], ["branch5x5_1", "branch5x5_2"],
          ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], ["branch_pool"]],
    "B": [["branch3x3"], ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], "maxpool"],
    "C": [["branch1x1"], ["branch7x7_1", "branch7x7_2", "branch7x7_3"],
          ["branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"],
          ["branch_pool"]],
    "D": [["branch3x3_1", "branch3x3_2"], ["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
          "maxpool"],
    "E": [["branch1x1"], ["branch3x3_1", "branch3x3_2a"], ["branch3x3_1", "branch3x3_2b"],
          ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3a"],
          ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3b"], ["branch_pool"]],
}
# block -> (kind, output channels of each branch in cat order)
BLOCKS = {
    "Mixed_5b": ("A", [64, 64, 96, 32]), "Mixed_5c": ("A", [64, 64, 96, 64]),
    "Mixed_5d": ("A", [64, 64, 96, 64]), "Mixed_6a": ("B", [384, 96, 288]),
    "Mixed_6b": ("C", [192] * 4), "Mixed_6c": ("C", [192] * 4), "Mixed_6d": ("C", [192] * 4),
    "Mixed_6e": ("C", [192] * 4), "Mixed_7a": ("D", [320, 192, 768]),
    "Mixed_7b": ("E", [320, 384, 384, 384, 384, 192]), "Mixed_7c": ("E", [320, 384, 384, 384, 384, 192]),
}
STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]


def coded_inception() -> tuple[inception.InceptionV3, dict]:
    """Zero conv weights and BatchNorm = identity + a shift: relu(bn(0)) = shift, so layer k outputs the
    constant k + 1 on every channel and pixel, whatever its input. A block's output channels then say
    which branch each came from, and a layer's input says which layer ran just before it."""
    model, codes = inception.InceptionV3().eval(), {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, inception.BasicConv2d)]
    with torch.no_grad():
        for k, (name, layer) in enumerate(layers):
            layer.conv.weight.zero_()
            layer.bn.weight.fill_(1.0)
            layer.bn.running_mean.zero_()
            layer.bn.running_var.fill_(1.0)
            layer.bn.bias.fill_(k + 1.0)
            codes[name] = float(k + 1)
    return model, codes


def _runs(values: list) -> list[tuple]:
    """Run-length code [(value, count), ...]: a block's channels as (branch code, branch width) pairs."""
    runs = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs


def _record_channels(model) -> tuple[dict, dict]:
    """Hooks that store, per layer, its input channel values and, per block, its output channel values
    (after checking each map is constant over space, as the crafted weights make it)."""
    inputs, outputs = {}, {}

    def channels(t):
        assert torch.equal(t, t[..., :1, :1].expand_as(t)), "crafted activations must be constant in space"
        return t[0, :, 0, 0].tolist()
    for name, m in model.named_modules():
        if isinstance(m, inception.BasicConv2d):
            m.register_forward_pre_hook(lambda mod, inp, name=name: inputs.__setitem__(name, channels(inp[0])))
        elif name in BLOCKS:
            m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, channels(out)))
    return inputs, outputs


def _check_chain(inputs: dict, codes: dict, chain: list[str], first_input: list) -> None:
    """The first layer of a chain sees `first_input`; each later one the constant of the layer before."""
    assert inputs[chain[0]] == first_input, f"{chain[0]} does not get its block's input"
    for prev, layer in zip(chain, chain[1:]):
        assert set(inputs[layer]) == {codes[prev]}, f"{layer} runs after {prev} in the published graph"


def test_forward_order_and_branch_widths_of_every_block():
    model, codes = coded_inception()
    inputs, outputs = _record_channels(model)
    with torch.inference_mode():
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    _check_chain(inputs, codes, STEM[1:], [codes[STEM[0]]] * 32)
    x = [codes[STEM[-1]]] * 192                   # the stem's output, through its max pool
    for block, (kind, widths) in BLOCKS.items():
        expected = []
        for chain, width in zip(BRANCHES[kind], widths):
            if chain == "maxpool":
                assert len(x) == width
                expected += x
                continue
            _check_chain(inputs, codes, [f"{block}.{layer}" for layer in chain], x)   # pool: avg of constants
            expected += [codes[f"{block}.{chain[-1]}"]] * width
        assert _runs(outputs[block]) == _runs(expected), f"{block}: branch order or widths differ"
        x = expected


# ---------------------------------------------------------------------------------------- pools, preprocessing

def _window_reduce(x: np.ndarray, how: str) -> np.ndarray:
    """3x3 stride-1 pooling of (C, H, W) by explicit loops over the pixels inside the image."""
    c, h, w = x.shape
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            win = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].reshape(c, -1)
            out[:, i, j] = win.mean(1) if how == "mean" else win.max(1)
    return out


@pytest.mark.parametrize("block,c_in,how", [("Mixed_5b", 192, "mean"), ("Mixed_6c", 768, "mean"),
                                            ("Mixed_7b", 1280, "mean"), ("Mixed_7c", 2048, "max")])
def test_pool_branches_follow_the_tf_graph(model, block, c_in, how):
    # FID changes: TF's average pool ignores the zero padding; Mixed_7c max-pools.
    x = torch.randn(1, c_in, 5, 6, generator=torch.Generator().manual_seed(10))
    seen = {}
    branch = getattr(model, block).branch_pool
    handle = branch.register_forward_pre_hook(lambda mod, inp: seen.update(x=inp[0]))  # returns None
    with torch.inference_mode():
        getattr(model, block)(x)
    handle.remove()
    assert np.allclose(seen["x"][0].numpy(), _window_reduce(x[0].numpy(), how), atol=1e-5)


def _bilinear_half_pixel(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (H, W) with half-pixel centres (src = (i + 0.5) in/out - 0.5, clamped at 0)."""
    def taps(n_in):
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, None)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    r0, r1, wr = taps(img.shape[0])
    c0, c1, wc = taps(img.shape[1])
    rows = img[r0] * (1 - wr)[:, None] + img[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc) + rows[:, c1] * wc


def test_preprocess_is_pytorch_fid_convention():
    u8 = torch.randint(0, 256, (1, 3, 7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(11))
    x = inception.preprocess(u8)
    assert x.shape == (1, 3, 299, 299)
    expected = _bilinear_half_pixel(u8[0, 1].double().numpy() / 255, 299) * 2 - 1
    assert np.allclose(x[0, 1].numpy(), expected, atol=2e-6)
    big = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(15))
    assert torch.allclose(inception.preprocess(big), big.double().div(127.5).sub(1).float(), atol=1e-6)
    with pytest.raises(inception.FIDError, match="uint8"):
        inception.preprocess(torch.zeros(1, 3, 8, 8))


def test_quantisation_rule_by_hand():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, -1 + 0.4 / 127.5, -1 + 1.6 / 127.5, 1 / 255, 0.999])
    # (x + 1) * 127.5, clamped to [0, 255], rounded: 0.4 -> 0, 1.6 -> 2, 127.5 -> 128, 128 -> 128, 254.87 -> 255
    expected = [0, 0, 128, 255, 255, 0, 2, 128, 255]
    assert inception.quantize_to_uint8(x.view(1, 1, 1, -1)).flatten().tolist() == expected
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # every uint8 level survives the round trip
    assert inception.quantize_to_uint8(levels.float().view(1, 1, 1, -1)).flatten().tolist() == list(range(256))
    with pytest.raises(inception.FIDError, match=r"NaN/inf \(batch indices \[1\]\)"):
        inception.quantize_to_uint8(torch.tensor([0.0, float("nan")]).view(2, 1, 1, 1))


def test_features_shape_finite_and_batch_invariant(model):
    g = torch.Generator().manual_seed(12)
    x32 = torch.rand(2, 3, 32, 32, generator=g) * 2.2 - 1.1   # two generated images, slightly out of range
    x299 = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=g)
    with torch.inference_mode():
        f32, f299 = model(inception.quantize_to_uint8(x32)), model(x299)
        one_at_a_time = torch.cat([model(inception.quantize_to_uint8(x32[i:i + 1])) for i in range(2)])
    assert f32.shape == (2, 2048) and f299.shape == (1, 2048)
    for f in (f32, f299):
        assert f.dtype == torch.float32 and torch.isfinite(f).all()
    assert (f32[0] - f32[1]).abs().max() > 0  # features depend on the image
    assert np.allclose(f32.numpy(), one_at_a_time.numpy(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------- known answer

def test_pool3_known_answer_with_standard_weights():
    """Features of pytorch-fid's network (stored) against ours, both with the same weights file."""
    weights = os.environ.get("FID_WEIGHTS")
    if not weights:
        pytest.skip("known-answer test needs numerically standard weights: run with FID_WEIGHTS=/path/to/"
                    "weights.pth (the file named in tests/data/README.md) to check pool3 against pytorch-fid")
    with np.load(DATA / "inception_pool3_known_answer.npz") as f:
        sizes, digests, reference = f["sizes"].tolist(), f["image_sha256"].tolist(), f["features"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a converted copy: "not the standard FID weights" is expected
        net = inception.load_inception(weights)
    for size, digest, ref in zip(sizes, digests, reference):
        image = known_answer_image(size)
        assert hashlib.sha256(image.numpy().tobytes()).hexdigest() == digest, "the image formula changed"
        with torch.inference_mode():
            ours = net(image)[0].numpy()                                       # (2048,)
        err = np.abs(ours - ref).max()
        assert err < 1e-5 * max(1.0, np.abs(ref).max()), f"{size}x{size}: pool3 differs by {err:.3g}"


# ---------------------------------------------------------------------------------------- weights

def test_strict_load_with_and_without_batchnorm_counters(model, tmp_path):
    state = model.state_dict()
    full, no_counter = tmp_path / "random_inception.pth", tmp_path / "random_inception_no_nbt.pth"
    torch.save(state, full)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, no_counter)
    for path in (full, no_counter):
        with pytest.warns(UserWarning, match="not the standard FID weights"):
            loaded = inception.load_inception(path)
        assert loaded.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        for key, value in state.items():
            if key.endswith("num_batches_tracked") and path == no_counter:
                continue
            assert torch.equal(loaded.state_dict()[key], value), key


def _assert_weights_message(message: str):
    for part in (inception.FID_WEIGHTS_NAME, inception.FID_WEIGHTS_URL, inception.FID_WEIGHTS_HASH, "--weights"):
        assert part in message


def test_missing_corrupt_and_foreign_weights(tmp_path):
    with pytest.raises(inception.FIDError, match="no such file") as e:
        inception.load_inception(tmp_path / "nope.pth")
    _assert_weights_message(str(e.value))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a torch file" * 100)
    unreadable = "corrupt.pth: cannot read weights"
    with pytest.warns(UserWarning), pytest.raises(inception.FIDError, match=unreadable) as e:
        inception.load_inception(corrupt)
    _assert_weights_message(str(e.value))
    foreign = tmp_path / "foreign.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, foreign)
    with pytest.warns(UserWarning), pytest.raises(inception.FIDError, match="not the FID Inception state dict"):
        inception.load_inception(foreign)


def test_default_weights_offline_and_corrupt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / inception.FID_WEIGHTS_NAME
    assert inception.cached_weights_path() == cached and inception.find_weights() is None

    def offline(url, dst, hash_prefix=None, progress=True):
        assert url == inception.FID_WEIGHTS_URL and hash_prefix == inception.FID_WEIGHTS_HASH
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    # a failed download is a failure of the machine, not a bad input: RuntimeError, not FIDError
    with pytest.raises(RuntimeError, match="cannot download") as e:
        inception.load_inception()
    assert not isinstance(e.value, ValueError)
    _assert_weights_message(str(e.value))
    assert str(cached) in str(e.value) and not cached.exists()
    with pytest.raises(inception.FIDError, match="weights not found"):
        inception.load_inception(download=False)
    cached.write_bytes(b"truncated download")  # a half-written cache file
    with pytest.raises(inception.FIDError, match="corrupt .*delete it to re-download") as e:
        inception.load_inception()
    _assert_weights_message(str(e.value))
    assert inception.find_weights() == cached
