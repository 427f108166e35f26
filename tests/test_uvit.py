"""
Tests for uvit.py: v_pred = 0 at initialisation; shapes and gradients for every preset (paper-scale
ones with tiny widths on CPU, full width on the meta device); the paper-scale parameter count within
10% of 2.0B; a transformer block's parameters and FLOPs against their closed forms; dropout present
exactly at the configured resolutions (forward hooks: token grid vs conv levels); dependence on logsnr
and the class label; SiD2's residual skips (identity body at init, against a hand-built forward);
gradient checkpointing (same gradients); bad resolutions and token grids. The shared building blocks
(stems, ResBlock, conditioning) are tested in test_unet.py.
"""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from unet import depth_to_space, model_stats, space_to_depth
from uvit import PRESETS, TransformerBlock, UViT, UViTConfig, preset_config


def randomize_zero_params(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Random weights for the zero-initialised layers, as after some training (at init v_pred = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_widths(cfg: UViTConfig) -> UViTConfig:
    """Same levels, stem, token grid and dropout placement, with 8-16 channels and a 2-block transformer."""
    n = len(cfg.channels)
    return replace(cfg, channels=(8,) * (n - 1) + (16,), num_blocks=(1,) * n, width=32, depth=2, head_dim=16,
                   emb_dim=16, norm_groups=8)


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_is_exactly_zero_at_init(name, num_classes):
    model = UViT(preset_config(name, num_classes=num_classes))
    z_t = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 9, 10]) if num_classes else None
    assert torch.equal(model(z_t, torch.randn(3) * 10, labels), torch.zeros_like(z_t))


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("residual", [False, True])
def test_every_preset_runs_with_tiny_widths(name, residual):
    cfg = PRESETS[name] if name in ("tiny", "small") else tiny_widths(PRESETS[name])
    model = randomize_zero_params(UViT(replace(cfg, residual_skips=residual)))
    z_t = torch.randn(1, 3, cfg.res, cfg.res)
    labels = torch.tensor([0]) if cfg.num_classes else None
    v_pred = model(z_t, torch.tensor([-3.0]), labels)
    assert v_pred.shape == z_t.shape
    v_pred.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_small_follows_res_and_stem():
    """token_res = 0: the grid follows res (64 px, 2x2 patches, one conv level -> 16x16 tokens)."""
    for res, stem, factor in [(64, "patch", 2), (64, "wavelet", 4), (16, "none", 1)]:
        cfg = replace(tiny_widths(preset_config("small")), res=res, stem=stem, stem_factor=factor)
        model = UViT(cfg)
        assert model.pos_emb.shape == (1, (res // (2 * factor)) ** 2, 32)
        assert model(torch.randn(2, 3, res, res), torch.zeros(2)).shape == (2, 3, res, res)


def test_paper_presets_on_meta_device_and_2b_parameters():
    for name in ("64", "128", "256", "512"):
        cfg = PRESETS[name]
        with torch.device("meta"):
            model = UViT(cfg)
            v_pred = model(torch.zeros(2, 3, cfg.res, cfg.res), torch.zeros(2), torch.zeros(2, dtype=torch.long))
        assert v_pred.shape == (2, 3, cfg.res, cfg.res) and model.grid == 16
        params = sum(p.numel() for p in model.parameters())
        assert 1.8e9 <= params <= 2.2e9, f"{name}: {params / 1e9:.2f}B parameters, the paper's U-ViT has about 2B"


def test_transformer_block_params_and_flops_match_closed_form():
    """Per block: adaLN W_mod (E x 4D), qkv (D x 3D), proj (D x D), MLP (D x 4D, 4D x D), with biases;
    forward FLOPs 2 per multiply-add: 2 N (12 D^2) for the projections, 2 (2 N^2 D) for q k^T and A v,
    2 E 4D for W_mod. Counted as the difference between depth 3 and depth 1."""
    D, E, N = 32, 16, 64
    block = TransformerBlock(D, E, head_dim=16, mlp_ratio=4, dropout=0.0)
    # 13 D biases: W_mod 4D, qkv 3D, proj D, MLP 4D + D.
    assert sum(p.numel() for p in block.parameters()) == 12 * D * D + 4 * E * D + 13 * D
    cfg = replace(tiny_widths(preset_config("tiny")), width=D, emb_dim=E)     # 8x8 = 64 tokens
    (p1, f1), (p3, f3) = model_stats(UViT, replace(cfg, depth=1)), model_stats(UViT, replace(cfg, depth=3))
    assert (f3 - f1) / 2 == 2 * N * 12 * D * D + 2 * 2 * N * N * D + 2 * E * 4 * D
    assert (p3 - p1) / 2 == 12 * D * D + 4 * E * D + 13 * D


@pytest.mark.parametrize("where,expected_res", [((8,), {8}), ((16,), {16}), ((16, 8), {16, 8})])
def test_dropout_only_at_configured_resolutions(where, expected_res):
    """tiny: one conv level at 16x16, then an 8x8 token grid. Dropout sees (B, C, 16, 16) maps in the
    conv level and (B, 64, D) tokens in the transformer; report both as a side length."""
    model = randomize_zero_params(UViT(preset_config("tiny", dropout=0.5, dropout_resolutions=where))).train()
    seen = set()

    def record(module, inputs, output):
        x = inputs[0]
        seen.add(x.shape[-1] if x.dim() == 4 else int(x.shape[1] ** 0.5))
        assert (output == 0).any() and module.p == 0.5

    n_dropout = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_hook(record)
            n_dropout += 1
    model(torch.randn(2, 3, 32, 32), torch.zeros(2))
    assert seen == expected_res
    # Counted independently: 2 ResBlocks (1 down, 1 up) at 16x16, 2 transformer blocks at 8x8.
    assert n_dropout == 2 * (16 in where) + 2 * (8 in where)


def test_output_depends_on_logsnr_and_label():
    model = randomize_zero_params(UViT(preset_config("tiny", num_classes=5))).eval()
    z_t = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1)
    out = model(z_t, torch.tensor([0.0, 0.0, 3.0, 0.0]), torch.tensor([1, 2, 1, 5]))
    assert (out[0] - out[1]).abs().max() > 1e-4     # label 1 vs 2
    assert (out[0] - out[2]).abs().max() > 1e-4     # logsnr 0 vs 3
    torch.testing.assert_close(model(z_t[:1], torch.zeros(1)), out[3:4])   # None = the null label 5


def test_residual_skips_start_as_identity_body():
    """Residual U-ViT at zero init with a zero position embedding: the transformer returns its input d,
    so every level gives up(h - d) + h_l = h_l = h and v_pred = inverse(head(conv_in(stem(z_t))))."""
    model = UViT(preset_config("tiny", residual_skips=True, channels=(16, 16), num_blocks=(1, 1), res=64))
    with torch.no_grad():
        model.pos_emb.zero_()
        model.head[-1].weight.normal_(0, 0.05), model.head[-1].bias.normal_(0, 0.05)
    z_t = torch.randn(2, 3, 64, 64)
    expected = depth_to_space(model.head(model.conv_in(space_to_depth(z_t, 2))), 2)
    torch.testing.assert_close(model(z_t, torch.randn(2)), expected, rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_gives_the_same_gradients():
    plain = randomize_zero_params(UViT(preset_config("tiny")))
    ckpt = UViT(preset_config("tiny", grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    z_t, logsnr = torch.randn(2, 3, 32, 32), torch.randn(2)
    for m in (plain, ckpt):
        m(z_t, logsnr).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"factor 4 .*nearest valid res: 32"):
        UViT(preset_config("small", res=30))
    with pytest.raises(ValueError, match=r"factor 16 .*32x32 token grid, but token_res=16; nearest valid res: 256"):
        UViT(preset_config("512", res=512, stem_factor=2))
    with pytest.raises(ValueError, match="width=40 is not a multiple of head_dim=16"):
        UViT(preset_config("tiny", width=40))
    with pytest.raises(ValueError, match="unknown UViTConfig field"):
        preset_config("tiny", depht=3)
    model = UViT(preset_config("tiny", num_classes=2))
    with pytest.raises(ValueError, match=r"expected \(B, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1))
    with pytest.raises(ValueError, match="class label -1 out of range"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.tensor([-1]))
