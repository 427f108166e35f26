"""
Tests for unet.py's own parts: the invertible first layers against independent references (explicit
indexing for space-to-depth; the JPEG2000 5/3 filter bank as a convolution for the wavelet, and the
dyadic multi-level layout assembled band by band), exact inverses, the attention block against softmax
written out from its weight tensors, and the FLOPs of the tiny preset against a closed form written
from its diagram (and meta vs CPU counts). What both networks share is tested in test_models.py.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import randomize_zero_params, softmax_attention
from unet import (Attention, Stem, UNet, depth_to_space, dyadic_wavelet53, inverse_dyadic_wavelet53,
                  inverse_wavelet53, model_stats, preset_config, space_to_depth, wavelet53)

pytestmark = pytest.mark.usefixtures("seeded")


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


def _filter_bank_2d(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One 2D level by the filter bank, bands (LL, LH, HL, HH): first letter along W, second along H."""
    low, high = _lift53_filter_bank(x)                    # along W
    ll, lh = _lift53_filter_bank(low.transpose(-1, -2))   # along H
    hl, hh = _lift53_filter_bank(high.transpose(-1, -2))
    return tuple(b.transpose(-1, -2) for b in (ll, lh, hl, hh))


def test_wavelet_matches_filter_bank_reference():
    """One level: the four bands of each input channel on consecutive channels, LL, LH, HL, HH."""
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    ref = torch.stack(_filter_bank_2d(x), dim=2).flatten(1, 2)
    torch.testing.assert_close(wavelet53(x), ref, rtol=0, atol=1e-12)


def test_wavelet_of_constant_image_is_all_low_band():
    y = wavelet53(torch.full((1, 2, 8, 8), 3.0, dtype=torch.float64)).unflatten(1, (2, 4))
    assert torch.equal(y[:, :, 0], torch.full((1, 2, 4, 4), 3.0, dtype=torch.float64))
    assert not y[:, :, 1:].any()


def _dyadic_reference(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The paper's multi-level layout, assembled one channel at a time: level l+1 filters level l's LL;
    per input channel c, channels c 4^L + k hold LL, LH, HL, HH of level L, then for l = L-1 .. 1 the
    bands LH, HL, HH of level l cut into p x p patches (p = 2^(L-l)), entry (i, j) of each patch on
    its own channel, i p + j."""
    B, C, H, W = x.shape
    f = 2 ** levels
    bands, ll = [], x
    for _ in range(levels):
        ll, lh, hl, hh = _filter_bank_2d(ll)
        bands.append((lh, hl, hh))
    out = torch.empty(B, C * f * f, H // f, W // f, dtype=x.dtype)
    for c in range(C):
        k = c * f * f
        for band in (ll, *bands[-1]):
            out[:, k] = band[:, c]
            k += 1
        for level in range(levels - 1, 0, -1):
            p = 2 ** (levels - level)
            for band in bands[level - 1]:
                for i in range(p):
                    for j in range(p):
                        out[:, k] = band[:, c, i::p, j::p]
                        k += 1
    return out


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_dyadic_wavelet_matches_band_by_band_reference_and_inverts(levels):
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    y = dyadic_wavelet53(x, levels)
    torch.testing.assert_close(y, _dyadic_reference(x, levels), rtol=0, atol=1e-12)
    torch.testing.assert_close(inverse_dyadic_wavelet53(y, levels), x, rtol=0, atol=1e-12)


def test_two_level_wavelet_at_512_has_the_papers_maps():
    """512 px, 2 levels: per colour 4 maps of 128^2 from level 2 (LL first) and level 1's three 256^2
    high bands, each packed into 4 maps of 128^2. Level 1's LH band comes back from channels 4..7."""
    x = torch.randn(1, 3, 512, 512, dtype=torch.float64)
    y = Stem("wavelet", 4)(x)
    assert y.shape == (1, 48, 128, 128)
    ll1, lh1, _, _ = _filter_bank_2d(x)
    torch.testing.assert_close(depth_to_space(y[:, 4:8], 2)[:, 0], lh1[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(y[:, 0], _filter_bank_2d(ll1)[0][:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind,factor", [("wavelet", 2), ("wavelet", 4), ("wavelet", 8), ("patch", 2), ("patch", 4),
                                         ("none", 1)])
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
# Attention and FLOPs.

def test_attention_matches_hand_written_softmax():
    """x + proj(softmax(Q K^T / sqrt(d)) V) with Q, K, V from the GroupNorm'd map, computed in the test
    from the module's weights; token n is the pixel (n // W, n % W). A 3 x 5 map catches H/W mix-ups."""
    attn = randomize_zero_params(Attention(16, head_dim=8, groups=4)).double()
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    groups = x.view(2, 4, -1)
    normed = ((groups - groups.mean(-1, keepdim=True)) / (groups.var(-1, unbiased=False, keepdim=True)
                                                          + attn.norm.eps).sqrt()).view_as(x)
    normed = normed * attn.norm.weight[:, None, None] + attn.norm.bias[:, None, None]
    tokens = torch.stack([normed[:, :, n // 5, n % 5] for n in range(15)], dim=1)       # (B, N, C)
    heads = softmax_attention(tokens, attn.qkv.weight[:, :, 0, 0], attn.qkv.bias, heads=2)
    out = heads @ attn.proj.weight[:, :, 0, 0].T + attn.proj.bias                        # (B, N, C)
    expected = x + torch.stack([out[:, 5 * i + j] for i in range(3) for j in range(5)], dim=-1).view_as(x)
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-12)


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
