"""
Tests that both networks (unet.UNet and uvit.UViT) must pass, each parametrised over the two: v_pred = 0
at initialisation; every preset at tiny widths (shapes, finite gradients), with and without SiD2's
residual skips; other resolutions and stems; the paper-scale presets at full width on the meta device;
the parameter count of every preset against a closed form written here from the architecture; dropout
exactly at the configured resolutions (forward hooks); dependence on logsnr and the class label; the
residual variant's identity body at init (against a hand-built forward); gradient checkpointing (same
gradients); clear errors for bad configurations and inputs; the config through a checkpoint round trip;
the attention blocks' token-permutation equivariance.
"""
import json
import math
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn as nn

from conftest import MODELS, build, randomize_zero_params, tiny_widths
from unet import Attention, ResBlock, depth_to_space, space_to_depth
from uvit import TransformerBlock

pytestmark = pytest.mark.usefixtures("seeded")      # weights and inputs come from the global RNG
NAMES = list(MODELS)
ALL_PRESETS = [(name, preset) for name in NAMES for preset in MODELS[name][2]]


def preset(name: str, preset_name: str, **overrides):
    """unet.preset_config or uvit.preset_config by model name."""
    return MODELS[name][1](preset_name, **overrides)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("preset_name", ["tiny", "small"])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_is_exactly_zero_at_init(name, preset_name, num_classes):
    model = build(preset(name, preset_name, num_classes=num_classes))
    z_t = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 9, 10]) if num_classes else None     # 10: the null label
    assert torch.equal(model(z_t, torch.randn(3) * 10, labels), torch.zeros_like(z_t))


@pytest.mark.parametrize("name,preset_name", ALL_PRESETS)
@pytest.mark.parametrize("residual", [False, True])
def test_every_preset_runs_with_tiny_widths(name, preset_name, residual):
    """The preset's levels, stem, attention/dropout placement and resolution, at 8-16 channels on CPU:
    output shape, finite gradients for every parameter."""
    cfg = MODELS[name][2][preset_name]
    cfg = replace(cfg if preset_name in ("tiny", "small") else tiny_widths(cfg), residual_skips=residual)
    # Random output layers: at init only the head would get a gradient, hiding unused parameters.
    model = randomize_zero_params(build(cfg))
    z_t = torch.randn(1, 3, cfg.res, cfg.res)
    labels = torch.tensor([cfg.num_classes - 1]) if cfg.num_classes else None
    v_pred = model(z_t, torch.tensor([1.5]), labels)
    assert v_pred.shape == z_t.shape
    v_pred.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("res,stem,factor", [(64, "patch", 2), (64, "wavelet", 4), (32, "wavelet", 2),
                                             (16, "none", 1)])
@pytest.mark.parametrize("residual", [False, True])
def test_small_architecture_follows_res_and_stem(name, res, stem, factor, residual):
    """The U-ViT's token grid follows res (token_res = 0): res / (stem factor x 2 for its conv level)."""
    cfg = tiny_widths(preset(name, "small", res=res, stem=stem, stem_factor=factor, residual_skips=residual))
    model = randomize_zero_params(build(cfg))
    z_t = torch.randn(2, 3, res, res)
    assert model(z_t, torch.zeros(2)).shape == z_t.shape
    if name == "uvit":
        assert model.pos_emb.shape == (1, (res // (2 * factor)) ** 2, cfg.width)


# ---------------------------------------------------------------------------------------------------
# Parameter counts written out from the architecture (the docstrings of unet.py and uvit.py).

def resblock_params(c_in: int, c_out: int, e: int, attn: bool) -> int:
    n = 2 * c_in + 9 * c_in * c_out + c_out                  # GroupNorm (scale, shift), conv3x3
    n += 2 * e * c_out + 2 * c_out                           # embedding -> (scale, shift)
    n += 2 * c_out + 9 * c_out * c_out + c_out               # GroupNorm, conv3x3
    n += (c_in * c_out + c_out) * (c_in != c_out)            # 1x1 conv on the skip path
    return n + attn * (2 * c_out + 3 * c_out * c_out + 3 * c_out + c_out * c_out + c_out)   # GN, qkv, proj


def frame_params(cfg) -> int:
    """logsnr MLP (64 sin + 64 cos features), class table with its null row, conv_in, head."""
    e, c0, s = cfg.emb_dim, cfg.channels[0], cfg.in_channels * cfg.stem_factor ** 2
    cond = 128 * e + e + e * e + e + (cfg.num_classes + 1) * e * (cfg.num_classes > 0)
    return cond + 9 * s * c0 + c0 + 2 * c0 + 9 * c0 * s + s


def levels_params(cfg, next_channels, attn) -> int:
    """Down and up ResBlocks per level (up blocks see 2C with concatenated skips), 1x1 convs without bias."""
    total = 0
    for c, nxt, nb, a in zip(cfg.channels, next_channels, cfg.num_blocks, attn):
        up_in = c if cfg.residual_skips else 2 * c
        total += nb * (resblock_params(c, c, cfg.emb_dim, a) + resblock_params(up_in, c, cfg.emb_dim, a))
        total += 2 * c * nxt
    return total


def closed_form_params(cfg) -> int:
    """Every parameter of a UNetConfig or UViTConfig network, summed from the pieces above."""
    ch, n = cfg.channels, len(cfg.channels)
    if hasattr(cfg, "attn_resolutions"):                     # U-Net: the lowest level has no down/up conv
        sizes = [cfg.res // (cfg.stem_factor * 2 ** i) for i in range(n)]
        attn = [r in cfg.attn_resolutions for r in sizes]
        middle = sum(resblock_params(ch[-1], ch[-1], cfg.emb_dim, a) for a in (True, False))   # +attn, plain
        return frame_params(cfg) + levels_params(cfg, ch[1:] + (0,), attn) + middle
    # U-ViT: conv levels without attention, the last one pooling to D; then tokens and blocks.
    D, E, hidden = cfg.width, cfg.emb_dim, cfg.mlp_ratio * cfg.width
    block = (3 * D * D + 3 * D) + (D * D + D) + 2 * cfg.head_dim * cfg.qk_norm      # qkv, W_o, gains
    block += (D * hidden + hidden) + (hidden * D + D) + (E * 2 * hidden + 2 * hidden)  # W_1, W_2, W_film
    tokens = (cfg.res // (cfg.stem_factor * 2 ** n)) ** 2
    return frame_params(cfg) + levels_params(cfg, ch[1:] + (D,), [False] * n) + tokens * D + cfg.depth * block


@pytest.mark.parametrize("name,preset_name", ALL_PRESETS)
def test_parameter_count_matches_closed_form(name, preset_name):
    """Exact, for every preset and its residual variant (whose up blocks take C, not 2C, channels)."""
    cfg = MODELS[name][2][preset_name]
    for c in (cfg, replace(cfg, residual_skips=True)):
        with torch.device("meta"):
            model = build(c)
        assert sum(p.numel() for p in model.parameters()) == closed_form_params(c)


@pytest.mark.parametrize("name", NAMES)
def test_paper_presets_on_meta_device(name):
    """Full width, no memory: construction and a forward pass of shapes only. The U-ViT at 128-512 must
    have the paper's "about 2B" parameters: within 10%, the rounding "about 2B" allows."""
    for preset_name in ("64", "128", "256", "512"):
        cfg = MODELS[name][2][preset_name]
        with torch.device("meta"):
            model = build(cfg)
            v_pred = model(torch.zeros(2, 3, cfg.res, cfg.res), torch.zeros(2), torch.zeros(2, dtype=torch.long))
        assert v_pred.shape == (2, 3, cfg.res, cfg.res) and v_pred.device.type == "meta"
        if name == "uvit":
            params = sum(p.numel() for p in model.parameters())
            assert model.grid == 16 and (preset_name == "64" or 1.8e9 <= params <= 2.2e9), params


# ---------------------------------------------------------------------------------------------------
# Behaviour.

def side(x: torch.Tensor) -> int:
    """Side length of a (B, C, H, W) map or of the square grid of a (B, N, D) token sequence."""
    return x.shape[-1] if x.dim() == 4 else math.isqrt(x.shape[1])


@pytest.mark.parametrize("name,where,count", [
    ("unet", (16, 8), 6),     # small at 64: levels 32, 16, 8; one down + one up ResBlock each, middle 2 at 8
    ("unet", (32,), 2),
    ("uvit", (8,), 2),        # tiny: one conv level at 16x16 (down + up ResBlock), 2 blocks on 8x8 tokens
    ("uvit", (16,), 2),
    ("uvit", (16, 8), 4)])
def test_dropout_only_at_configured_resolutions(name, where, count):
    cfg = preset(name, "small", res=64) if name == "unet" else preset(name, "tiny")
    cfg = tiny_widths(replace(cfg, dropout=0.5, dropout_resolutions=where))
    model = randomize_zero_params(build(cfg)).train()
    fired, block_side = [], {}

    def record_dropout(module, inputs, output):
        fired.append((side(inputs[0]), module.p == 0.5 and (output == 0).any() and not (inputs[0] == 0).all()))

    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, TransformerBlock))]
    hooks = [m.register_forward_hook(record_dropout) for m in dropouts]
    hooks += [m.register_forward_hook(lambda module, inputs, output: block_side.__setitem__(module, side(inputs[0])))
              for m in blocks]
    z_t = torch.randn(2, 3, cfg.res, cfg.res)
    model(z_t, torch.zeros(2))
    for hook in hooks:                                       # the eval-mode calls below must not record
        hook.remove()
    assert {s for s, _ in fired} == set(where) and all(ok for _, ok in fired) and len(dropouts) == count
    for block in blocks:
        assert isinstance(block.dropout, nn.Dropout) == (block_side[block] in where)
    assert not torch.equal(model(z_t, torch.zeros(2)), model(z_t, torch.zeros(2)))   # train mode: random
    model.eval()
    assert torch.equal(model(z_t, torch.zeros(2)), model(z_t, torch.zeros(2)))


@pytest.mark.parametrize("name", NAMES)
def test_output_depends_on_logsnr_and_label(name):
    model = randomize_zero_params(build(preset(name, "tiny", num_classes=5))).eval()
    z_t = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1)    # one image: only logsnr and label vary
    out = model(z_t, torch.tensor([0.0, 0.0, 3.0, 0.0]), torch.tensor([1, 2, 1, 5]))
    assert (out[0] - out[1]).abs().max() > 1e-4     # label 1 vs 2
    assert (out[0] - out[2]).abs().max() > 1e-4     # logsnr 0 vs 3
    assert (out[0] - out[3]).abs().max() > 1e-4     # label 1 vs null
    # None means the null label (classifier-free guidance's unconditional branch).
    torch.testing.assert_close(model(z_t[:1], torch.zeros(1)), out[3:4])


@pytest.mark.parametrize("name,overrides", [
    ("unet", dict(channels=(16, 32, 32), num_blocks=(1, 2, 1))),
    ("uvit", dict(channels=(16, 16), num_blocks=(1, 1), res=64))])
def test_residual_skips_start_as_identity_body(name, overrides):
    """SiD2's residual variant as constructed (no weights touched but the head's): every block returns
    its input, so the levels below give back `pooled` unchanged and up(h - pooled) + h_l = h_l = h at
    every level; v_pred = inverse(head(conv_in(stem(z_t)))) exactly. For the U-ViT this needs the
    position embedding to start at zero."""
    cfg = preset(name, "tiny", residual_skips=True, **overrides)
    model = build(cfg)
    with torch.no_grad():
        model.head[-1].weight.normal_(0, 0.05), model.head[-1].bias.normal_(0, 0.05)
    z_t = torch.randn(2, 3, cfg.res, cfg.res)
    expected = depth_to_space(model.head(model.conv_in(space_to_depth(z_t, 2))), 2)
    assert expected.abs().max() > 0.01                       # not the trivial v_pred = 0
    torch.testing.assert_close(model(z_t, torch.randn(2)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_gives_the_same_gradients(name):
    """Recomputing the blocks in the backward pass must not change any gradient."""
    plain = randomize_zero_params(build(preset(name, "tiny")))
    ckpt = build(preset(name, "tiny", grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    z_t, logsnr = torch.randn(2, 3, 32, 32), torch.randn(2)
    for m in (plain, ckpt):
        m(z_t, logsnr).square().sum().backward()
    for (param_name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=param_name)


def call(name, z_shape, logsnr_shape, labels=None, **overrides):
    """A call of the tiny preset with the given input shapes (built when the case runs)."""
    return lambda: build(preset(name, "tiny", **overrides))(torch.zeros(z_shape), torch.zeros(logsnr_shape), labels)


BAD_INPUTS = [
    ("unet", lambda: build(preset("unet", "small", res=30)), r"factor 8 .*nearest valid res: 32"),
    ("unet", lambda: build(preset("unet", "512", res=50)), r"factor 64 .*nearest valid res: 64"),
    ("unet", lambda: preset("unet", "huge"), "unknown preset"),
    ("unet", lambda: preset("unet", "tiny", chanels=(8,)), "unknown UNetConfig field"),
    ("unet", lambda: build(preset("unet", "tiny", head_dim=24)), "head_dim"),
    ("unet", call("unet", (1, 1, 32, 32), 1, num_classes=3), r"expected \(B, 3, 32, 32\)"),
    ("unet", call("unet", (1, 3, 32, 32), 1, torch.tensor([4]), num_classes=3),
     "class label 4 out of range; valid labels: 0..2, or 3"),
    ("unet", call("unet", (1, 3, 32, 32), 1, torch.tensor([1])), "unconditional"),
    ("unet", call("unet", (2, 3, 32, 32), 3, num_classes=3), "logsnr has shape"),
    ("unet", lambda: build(preset("unet", "tiny", stem="wavelet", stem_factor=3)), "a power of two"),
    ("uvit", lambda: build(preset("uvit", "small", res=30)), r"factor 4 .*nearest valid res: 32"),
    ("uvit", lambda: build(preset("uvit", "512", res=512, stem_factor=2)),
     r"factor 16 .*32x32 token grid, but token_res=16; nearest valid res: 256"),
    ("uvit", lambda: build(preset("uvit", "tiny", width=40)), "width=40 is not a multiple of head_dim=16"),
    ("uvit", lambda: preset("uvit", "tiny", depht=3), "unknown UViTConfig field"),
    ("uvit", call("uvit", (1, 3, 64, 64), 1, num_classes=2), r"expected \(B, 3, 32, 32\)"),
    ("uvit", call("uvit", (1, 3, 32, 32), 1, torch.tensor([-1]), num_classes=2),
     "class label -1 out of range"),
]


@pytest.mark.parametrize("name,make,match", BAD_INPUTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_inputs_give_clear_errors(name, make, match):
    """Each bad configuration or call raises a ValueError that names the problem (and the fix)."""
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", NAMES)
def test_config_survives_a_checkpoint_round_trip(name, tmp_path):
    """asdict(config) through torch.save / torch.load(weights_only=True) and through JSON (lists):
    the rebuilt config is equal and the rebuilt model loads the state dict strictly, same output."""
    cfg = preset(name, "tiny", num_classes=4)
    model = randomize_zero_params(build(cfg))
    torch.save({"model_config": asdict(cfg), "model": model.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for d in (ckpt["model_config"], json.loads(json.dumps(ckpt["model_config"]))):
        assert type(cfg)(**d) == cfg
        rebuilt = build(type(cfg)(**d))
        rebuilt.load_state_dict(ckpt["model"])
        z_t, logsnr = torch.randn(2, 3, 32, 32), torch.randn(2)
        torch.testing.assert_close(rebuilt(z_t, logsnr), model(z_t, logsnr))


@pytest.mark.parametrize("which", ["unet-attention", "uvit-block", "uvit-block-without-qk-norm"])
def test_attention_is_token_permutation_equivariant(which):
    """Without a position embedding, attention (and everything per-token around it) treats tokens as a
    set: permuting the input tokens permutes the output tokens the same way."""
    perm = torch.randperm(15)
    if which == "unet-attention":                            # 15 tokens = the 3 x 5 positions of a map
        module, x = randomize_zero_params(Attention(16, head_dim=8, groups=4)), torch.randn(2, 16, 3, 5)
        run = lambda tokens: module(tokens.view(2, 16, 3, 5)).flatten(2)       # noqa: E731
        tokens, axis = x.flatten(2), 2
    else:
        module = randomize_zero_params(TransformerBlock(16, 8, 8, 4, 0.0, qk_norm=which == "uvit-block"))
        emb = torch.randn(2, 8)
        run = lambda tokens: module(tokens, emb)                                # noqa: E731
        tokens, axis = torch.randn(2, 15, 16), 1
    out = run(tokens)
    # Identical output tokens would pass any permutation: make sure they differ.
    assert (out - out.mean(axis, keepdim=True)).abs().max() > 1e-3
    torch.testing.assert_close(run(tokens.index_select(axis, perm)), out.index_select(axis, perm))


@pytest.mark.parametrize("name", MODELS)
def test_inverse_wavelet_runs_in_fp32_under_bf16_autocast(name, seeded):
    """Under bf16 autocast the head's output is cast to fp32 before the (exact) inverse wavelet: the model
    returns fp32, and that output equals the inverse transform applied to the fp32 cast of the head's
    bf16 output (computed here through a hook)."""
    model_cls, preset_config, _ = MODELS[name]
    model = randomize_zero_params(model_cls(preset_config("small", res=64, stem="wavelet", stem_factor=4)))
    heads = []
    model.head.register_forward_hook(lambda mod, args, out: heads.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_pred = model(torch.randn(2, 3, 64, 64), torch.zeros(2))
    assert heads[0].dtype == torch.bfloat16 and v_pred.dtype == torch.float32
    torch.testing.assert_close(v_pred, model.stem.inverse(heads[0].float()), rtol=0, atol=0)
