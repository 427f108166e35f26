"""
Tests for unet.py: the invertible first layers against independent references (explicit indexing for
space-to-depth, a filter-bank convolution for the 5/3 wavelet), v_pred = 0 at initialisation, shapes
and gradients for every preset (paper-scale ones with tiny widths on CPU, full width on the meta
device), dropout present exactly at the configured resolutions (forward hooks), dependence on logsnr
and on the class label, SiD2's residual skips (identity body at init, checked against a hand-built
forward), gradient checkpointing (same gradients), FLOPs against a closed form written from the tiny
preset's diagram (and meta vs CPU counts), the config through a checkpoint round trip, bad inputs.
"""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from unet import (PRESETS, ResBlock, Stem, UNet, UNetConfig, depth_to_space, inverse_wavelet53,
                  model_stats, preset_config, space_to_depth, wavelet53)


def randomize_zero_params(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Give the zero-initialised output layers random weights, as training would, so the network's
    output depends on its inputs (at init it is exactly 0 by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_widths(cfg: UNetConfig) -> UNetConfig:
    """Same levels, stem, attention/dropout placement and resolution, but 8-16 channels and 1 block."""
    n = len(cfg.channels)
    return replace(cfg, channels=tuple(8 if i < n - 2 else 16 for i in range(n)), num_blocks=(1,) * n,
                   head_dim=8, emb_dim=16, norm_groups=8)


# ---------------------------------------------------------------------------------------------------
# First layers.

def test_space_to_depth_matches_explicit_indexing_and_inverts():
    x = torch.randn(2, 3, 8, 12)
    for p in (2, 4):
        y = space_to_depth(x, p)
        ref = torch.empty(2, 3 * p * p, 8 // p, 12 // p)
        for c in range(3):
            for i in range(p):
                for j in range(p):
                    ref[:, c * p * p + i * p + j] = x[:, c, i::p, j::p]
        assert torch.equal(y, ref)
        assert torch.equal(depth_to_space(y, p), x)


def _lift53_filter_bank(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent route to the 5/3 analysis: the JPEG2000 filters (-1, 2, 6, 2, -1)/8 on even and
    (-1, 2, -1)/2 on odd samples, with whole-sample symmetric (torch 'reflect') padding, along the last axis."""
    shape = x.shape
    xp = F.pad(x.reshape(-1, 1, shape[-1]), (2, 2), mode="reflect")
    h0 = torch.tensor([-1, 2, 6, 2, -1], dtype=x.dtype).view(1, 1, 5) / 8
    h1 = torch.tensor([-1, 2, -1], dtype=x.dtype).view(1, 1, 3) / 2
    low = F.conv1d(xp, h0, stride=2)                      # centred on x[2n]
    high = F.conv1d(xp[..., 2:], h1, stride=2)            # xp[2:] starts at x[0]: centred on x[2n+1]
    return low.reshape(*shape[:-1], -1), high.reshape(*shape[:-1], -1)


def test_wavelet_matches_filter_bank_reference():
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    low, high = _lift53_filter_bank(x)                    # along W
    ll, lh = _lift53_filter_bank(low.transpose(-1, -2))   # along H
    hl, hh = _lift53_filter_bank(high.transpose(-1, -2))
    ref = torch.stack([b.transpose(-1, -2) for b in (ll, lh, hl, hh)], dim=2).flatten(1, 2)
    torch.testing.assert_close(wavelet53(x), ref, rtol=0, atol=1e-12)


def test_wavelet_of_constant_image_is_all_low_band():
    y = wavelet53(torch.full((1, 2, 8, 8), 3.0, dtype=torch.float64)).unflatten(1, (2, 4))
    assert torch.equal(y[:, :, 0], torch.full((1, 2, 4, 4), 3.0, dtype=torch.float64))
    assert not y[:, :, 1:].any()


@pytest.mark.parametrize("kind,factor", [("wavelet", 2), ("wavelet", 4), ("patch", 2), ("patch", 4), ("none", 1)])
def test_stems_are_exactly_invertible(kind, factor):
    x = torch.randn(2, 3, 16, 32, dtype=torch.float64)
    stem = Stem(kind, factor)
    y = stem(x)
    assert y.shape == (2, 3 * factor ** 2, 16 // factor, 32 // factor)
    torch.testing.assert_close(stem.inverse(y), x, rtol=0, atol=1e-12)
    # ... and linear: the transform of a sum is the sum of the transforms.
    x2 = torch.randn_like(x)
    torch.testing.assert_close(stem(x + 2 * x2), y + 2 * stem(x2), rtol=0, atol=1e-12)


def test_wavelet_round_trip_in_float32_is_at_rounding_level():
    x = torch.randn(2, 3, 32, 32)
    assert (inverse_wavelet53(wavelet53(x)) - x).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------
# The network.

@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_is_exactly_zero_at_init(name, num_classes):
    model = UNet(preset_config(name, num_classes=num_classes))
    z_t = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 9, 10]) if num_classes else None
    assert torch.equal(model(z_t, torch.randn(3) * 10, labels), torch.zeros_like(z_t))


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_runs_with_tiny_widths(name):
    """The preset's levels, stem, attention/dropout placement and resolution, at 8-16 channels on CPU:
    output shape, finite gradients for every parameter."""
    cfg = PRESETS[name]
    if name not in ("tiny", "small"):
        cfg = tiny_widths(cfg)
    model = randomize_zero_params(UNet(cfg))
    z_t = torch.randn(1, 3, cfg.res, cfg.res)
    labels = torch.tensor([cfg.num_classes - 1]) if cfg.num_classes else None
    v_pred = model(z_t, torch.tensor([1.5]), labels)
    assert v_pred.shape == z_t.shape
    v_pred.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("res,stem,factor", [(64, "patch", 2), (64, "wavelet", 4), (32, "wavelet", 2), (16, "none", 1)])
@pytest.mark.parametrize("residual", [False, True])
def test_small_architecture_at_other_resolutions_and_stems(res, stem, factor, residual):
    cfg = tiny_widths(preset_config("small", res=res, stem=stem, stem_factor=factor, residual_skips=residual))
    model = randomize_zero_params(UNet(cfg))
    z_t = torch.randn(2, 3, res, res)
    assert model(z_t, torch.zeros(2)).shape == z_t.shape


def test_paper_presets_on_meta_device():
    """Full width, no memory: construction and a forward pass of shapes only."""
    for name in ("64", "128", "256", "512"):
        cfg = PRESETS[name]
        with torch.device("meta"):
            model = UNet(cfg)
            v_pred = model(torch.zeros(2, 3, cfg.res, cfg.res), torch.zeros(2), torch.zeros(2, dtype=torch.long))
        assert v_pred.shape == (2, 3, cfg.res, cfg.res) and v_pred.device.type == "meta"
        assert 2e8 < sum(p.numel() for p in model.parameters()) < 2.5e9


def test_dropout_only_at_configured_resolutions():
    cfg = tiny_widths(preset_config("small", res=64, dropout=0.5, dropout_resolutions=(16, 8)))  # levels 32, 16, 8
    model = randomize_zero_params(UNet(cfg)).train()
    seen, fired = [], []

    def record(module, inputs, output):
        seen.append(inputs[0].shape[-1])
        fired.append(bool((output == 0).any() and not (inputs[0] == 0).all()))

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_hook(record)
    # Every ResBlock at 32x32 must have no active dropout; every one at 16 or 8 must have p = 0.5.
    block_res = {}

    def record_block(module, inputs, output):
        block_res[id(module)] = inputs[0].shape[-1]

    for block in (m for m in model.modules() if isinstance(m, ResBlock)):
        block.register_forward_hook(record_block)
    model(torch.randn(2, 3, 64, 64), torch.zeros(2))
    assert set(seen) == {16, 8} and all(fired)
    for block in (m for m in model.modules() if isinstance(m, ResBlock)):
        has_dropout = isinstance(block.dropout, nn.Dropout) and block.dropout.p > 0
        assert has_dropout == (block_res[id(block)] in (16, 8))
    # Train mode is random, eval mode is deterministic.
    z_t = torch.randn(2, 3, 64, 64)
    assert not torch.equal(model(z_t, torch.zeros(2)), model(z_t, torch.zeros(2)))
    model.eval()
    assert torch.equal(model(z_t, torch.zeros(2)), model(z_t, torch.zeros(2)))


def test_output_depends_on_logsnr_and_label():
    model = randomize_zero_params(UNet(preset_config("tiny", num_classes=5))).eval()
    z_t = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1)
    out = model(z_t, torch.tensor([0.0, 0.0, 3.0, 0.0]), torch.tensor([1, 2, 1, 5]))
    assert (out[0] - out[1]).abs().max() > 1e-4     # label 1 vs 2
    assert (out[0] - out[2]).abs().max() > 1e-4     # logsnr 0 vs 3
    assert (out[0] - out[3]).abs().max() > 1e-4     # label 1 vs null
    # None means the null label (classifier-free guidance's unconditional branch).
    torch.testing.assert_close(model(z_t[:1], torch.zeros(1)), out[3:4])


def test_residual_skips_start_as_identity_body():
    """SiD2's residual U-Net with all blocks at their zero init: h_l = h, the levels below return d
    unchanged, so up(h - d) + h_l = h and v_pred = inverse(head(conv_in(stem(z_t)))) exactly."""
    model = UNet(preset_config("tiny", residual_skips=True, channels=(16, 32, 32), num_blocks=(1, 2, 1)))
    with torch.no_grad():
        head_conv = model.head[-1]
        head_conv.weight.normal_(0, 0.05), head_conv.bias.normal_(0, 0.05)
    z_t = torch.randn(2, 3, 32, 32)
    expected = depth_to_space(model.head(model.conv_in(space_to_depth(z_t, 2))), 2)
    torch.testing.assert_close(model(z_t, torch.randn(2)), expected, rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = randomize_zero_params(UNet(preset_config("tiny")))
    ckpt = UNet(preset_config("tiny", grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    z_t, logsnr = torch.randn(2, 3, 32, 32), torch.randn(2)
    for m in (plain, ckpt):
        m(z_t, logsnr).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def _conv(c_in, c_out, k, positions):
    return 2 * c_in * c_out * k * k * positions          # 2 FLOPs per multiply-add


def _attention(c, n):
    return _conv(c, 3 * c, 1, n) + 2 * (2 * n * n * c) + _conv(c, c, 1, n)   # qkv, q k^T and A v, proj


def test_stats_match_closed_form_and_a_real_cpu_model():
    """The tiny preset's forward FLOPs written out by hand from its diagram (levels 16x16 x 16 ch and
    8x8 x 32 ch, attention at 8x8, embedding width 32), against the meta-device count."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = preset_config("tiny")
    params, flops = model_stats(UNet, cfg)
    a, b, e = 256, 64, 32                                  # positions at 16x16 and 8x8, embedding width
    lin = lambda i, o: 2 * i * o                           # noqa: E731
    expected = (lin(128, e) + lin(e, e)                    # logsnr MLP (64 sin + 64 cos features)
                + _conv(12, 16, 3, a)                      # conv_in after 2x2 patching (12 channels)
                + 2 * _conv(16, 16, 3, a) + lin(e, 32)     # level 0 down ResBlock
                + _conv(16, 32, 1, b)                      # pool + 1x1 conv to level 1
                + 3 * (2 * _conv(32, 32, 3, b) + lin(e, 64)) + 2 * _attention(32, b)  # down block, middle
                + _conv(64, 32, 3, b) + _conv(32, 32, 3, b) + _conv(64, 32, 1, b) + lin(e, 64)
                + _attention(32, b)                        # level 1 up ResBlock (concat skip) + attention
                + _conv(32, 16, 1, b)                      # 1x1 conv before nearest up-sampling
                + _conv(32, 16, 3, a) + _conv(16, 16, 3, a) + _conv(32, 16, 1, a) + lin(e, 32)  # level 0 up
                + _conv(16, 12, 3, a))                     # head
    assert flops == expected
    model = UNet(cfg)
    # The math backend: torch's FLOP counter does not count the CPU flash-attention kernel.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(4, 3, 32, 32), torch.zeros(4))
    assert params == sum(p.numel() for p in model.parameters())
    assert flops * 4 == counter.get_total_flops()


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"factor 8 .*nearest valid res: 32"):
        UNet(preset_config("small", res=30))
    with pytest.raises(ValueError, match=r"factor 64 .*nearest valid res: 64"):
        UNet(preset_config("512", res=50))
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="unknown UNetConfig field"):
        preset_config("tiny", chanels=(8,))
    with pytest.raises(ValueError, match="head_dim"):
        UNet(preset_config("tiny", head_dim=24))
    model = UNet(preset_config("tiny", num_classes=3))
    with pytest.raises(ValueError, match=r"expected \(B, 3, 32, 32\)"):
        model(torch.zeros(1, 1, 32, 32), torch.zeros(1))
    with pytest.raises(ValueError, match="class label 4 out of range; valid labels: 0..2, or 3"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.tensor([4]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(preset_config("tiny"))(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.tensor([1]))
    with pytest.raises(ValueError, match="logsnr has shape"):
        model(torch.zeros(2, 3, 32, 32), torch.zeros(3))


def test_config_survives_a_checkpoint_round_trip(tmp_path):
    """asdict(config) through torch.save / torch.load(weights_only=True) and through JSON (lists):
    the rebuilt config is equal and the rebuilt model loads the state dict strictly, same output."""
    import json
    from dataclasses import asdict
    cfg = preset_config("tiny", num_classes=4)
    model = randomize_zero_params(UNet(cfg))
    torch.save({"model_config": asdict(cfg), "model": model.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for d in (ckpt["model_config"], json.loads(json.dumps(ckpt["model_config"]))):
        assert UNetConfig(**d) == cfg
        rebuilt = UNet(UNetConfig(**d))
        rebuilt.load_state_dict(ckpt["model"])
        z_t, logsnr = torch.randn(2, 3, 32, 32), torch.randn(2)
        torch.testing.assert_close(rebuilt(z_t, logsnr), model(z_t, logsnr))
