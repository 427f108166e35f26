"""
The U-ViT of simple diffusion (Sec. 3, Fig. 7 right): convolutional levels down to 16x16, a transformer there.

The idea. The U-Net's finding is that the capacity that matters sits at 16x16. Taking this to its
end, the U-ViT keeps the U-Net's convolutional ResBlock levels (and their skip connections) from the
input down to 32x32, average-pools once more to a 16x16 grid, and replaces everything below by a stack
of transformer blocks over those 256 tokens: pre-norm self-attention + MLP, both residual, with a
learned position embedding. In the words of Fig. 7's caption, the convolutions on the levels with
self-attention become MLP blocks, and only the ResBlock levels above keep skip connections. With the
5/3 wavelet as first layer (unet.py) the same network serves 256 and 512: only the parameter-free stem
changes. Transformers scale predictably, which is how the paper reaches about 2B parameters. Every
conv building block (stem, conditioning, ResBlock, Level) is imported from unet.py; this file adds the
transformer.

Levels of the paper-scale "256" preset (B batch, C channels, H W spatial, N tokens, D width):

    z_t (B, 3, 256, 256) --5/3 wavelet--> (B, 12, 128, 128) --conv3x3--> (B, 128, 128, 128)
    level 0  128x128, 128 ch: 2 ResBlocks ------------------ skips --> 2 ResBlocks (each concat a skip)
    level 1    64x64, 256 ch: 2 ResBlocks ------------------ skips --> 2 ResBlocks
    level 2    32x32, 512 ch: 2 ResBlocks ------------------ skips --> 2 ResBlocks
               avg-pool + 1x1 conv to D = 2048                            ^ 1x1 conv to 512 + nearest up
    tokens     16x16 = 256 tokens: + position embedding, 32 x [adaLN, attention, adaLN, MLP]
    head: GroupNorm, SiLU, zero-initialised conv3x3 -> (B, 12, 128, 128) --inverse wavelet--> v_pred

Transformer block (our choice of conditioning: adaptive LayerNorm, as DiT; the paper does not say):
    (shift1, scale1, shift2, scale2) = W_mod emb                      (zero-initialised: plain LN at start)
    x = x + Dropout(Proj(Attention(LN(x) (1 + scale1) + shift1)))     (Proj zero-initialised)
    x = x + Dropout(MLP(LN(x) (1 + scale2) + shift2))                 (MLP out zero-initialised)
Why adaLN and not a conditioning token: it is the same scale/shift mechanism as the ResBlocks' adaptive
group norm (one idea in the whole code), every token gets the noise level directly, and it costs no
sequence length. Its price is W_mod: emb_dim x 4D parameters per block (about 8M of 59M at D = 2048).
Symbols: z_t -> z_t, logSNR -> logsnr, v_hat -> v_pred, class label -> class_labels.

Choices the paper does not give: all hyper-parameters (PRESETS), GELU (tanh approximation) in a 4x MLP,
head_dim 128, no final LayerNorm (the up-sampling convs are followed by GroupNorms anyway, and the
residual variant needs the transformer to be the identity at init), dropout on both residual branches
of every transformer block when the token grid's size is in `dropout_resolutions`.
`residual_skips=True` is SiD2's residual U-ViT: one skip per conv level, h = up(h - d) + h_l (unet.Level).

Run `python uvit.py` for the preset table, `pytest tests/test_uvit.py` for the tests.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import (ConvLevelsModel, Conditioning, Level, Stem, check_common, check_inputs, check_resolution,
                  conv_level_resolutions, lists_to_tuples, make_preset_config, preset_cli, run_block, zero_head)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on (B, N, D) tokens, conditioned by adaptive LayerNorm; starts as the
    identity (zero-initialised attention and MLP output projections)."""

    def __init__(self, width: int, emb_dim: int, head_dim: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads = width // head_dim
        self.mod = nn.Linear(emb_dim, 4 * width)                  # shift/scale for both LayerNorms
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for layer in (self.mod, self.proj, self.mlp[-1]):
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        shift1, scale1, shift2, scale2 = self.mod(emb)[:, None].chunk(4, dim=-1)   # 4 x (B, 1, D)
        h = torch.addcmul(shift1, self.norm1(x), 1 + scale1)                      # adaLN
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, hd)
        h = F.scaled_dot_product_attention(q, k, v)                              # (B, heads, N, hd)
        x = x + self.dropout(self.proj(h.transpose(1, 2).reshape(B, N, D)))      # (B, N, D)
        h = torch.addcmul(shift2, self.norm2(x), 1 + scale2)
        return x + self.dropout(self.mlp(h))


@dataclass
class UViTConfig:
    res: int = 32                          # image size (square)
    in_channels: int = 3
    num_classes: int = 0                   # 0 = unconditional; else labels 0..n-1 plus null label n
    stem: str = "patch"                    # first layer: "patch" (space-to-depth) | "wavelet" (5/3) | "none"
    stem_factor: int = 2                   # its down-sampling (1, 2, 4, ...; a power of two for "wavelet")
    channels: tuple = (64,)                # conv levels, highest resolution first; each halves the size
    num_blocks: tuple = (2,)               # ResBlocks per conv level on the way down (as many up)
    token_res: int = 0                     # transformer grid size; 0 = whatever res / factor gives
    width: int = 160                       # transformer width D
    depth: int = 6                         # transformer blocks
    head_dim: int = 32
    mlp_ratio: int = 4
    emb_dim: int = 128                     # width of the logsnr/class embedding
    dropout: float = 0.0
    dropout_resolutions: tuple = ()        # feature-map / token-grid sizes that get dropout
    norm_groups: int = 32
    residual_skips: bool = False           # SiD2's one-skip-per-level residual U-ViT
    grad_checkpointing: bool = False

    def __post_init__(self):
        lists_to_tuples(self)


def validate_uvit(cfg: UViTConfig) -> int:
    """Check the configuration; returns the token grid size."""
    check_common(cfg)
    levels = len(cfg.channels)
    factor = cfg.stem_factor * 2 ** levels
    what = f"stem x{cfg.stem_factor}, then {levels} conv levels x{2 ** levels} down to the token grid"
    check_resolution(cfg, factor, what)
    grid = cfg.res // factor
    if cfg.token_res and grid != cfg.token_res:
        raise ValueError(f"UViTConfig: res={cfg.res} / down-sampling factor {factor} ({what}) gives a "
                         f"{grid}x{grid} token grid, but token_res={cfg.token_res}; nearest valid res: "
                         f"{cfg.token_res * factor} (or change stem_factor/channels, or token_res=0 to follow res)")
    if cfg.width % cfg.head_dim:
        raise ValueError(f"UViTConfig: width={cfg.width} is not a multiple of head_dim={cfg.head_dim}")
    return grid


class UViT(ConvLevelsModel):
    """forward(z_t (B, C, H, W), logsnr (B,), class_labels (B,) long or None) -> v_pred (B, C, H, W)."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.grid = validate_uvit(cfg)
        self.config, self.num_classes = cfg, cfg.num_classes
        ch, g, D = cfg.channels, cfg.norm_groups, cfg.width
        stem_channels = cfg.in_channels * cfg.stem_factor ** 2
        self.stem = Stem(cfg.stem, cfg.stem_factor)
        self.cond = Conditioning(cfg.emb_dim, cfg.num_classes)
        self.conv_in = nn.Conv2d(stem_channels, ch[0], 3, padding=1)
        # Conv levels without attention; the last one's pooling + 1x1 conv is the token embedding (to D).
        next_channels = list(ch[1:]) + [D]
        self.levels = nn.ModuleList(
            Level(ch[i], next_channels[i], cfg.num_blocks[i], cfg.emb_dim,
                  cfg.dropout if r in cfg.dropout_resolutions else 0.0, False, cfg.head_dim, g, cfg.residual_skips)
            for i, r in enumerate(conv_level_resolutions(cfg)))
        self.pos_emb = nn.Parameter(torch.randn(1, self.grid ** 2, D) * 0.02)   # learned, (1, N, D)
        token_dropout = cfg.dropout if self.grid in cfg.dropout_resolutions else 0.0
        self.blocks = nn.ModuleList(TransformerBlock(D, cfg.emb_dim, cfg.head_dim, cfg.mlp_ratio, token_dropout)
                                    for _ in range(cfg.depth))
        self.head = zero_head(ch[0], stem_channels, g)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, class_labels: torch.Tensor | None = None):
        logsnr = check_inputs(self, z_t, logsnr, class_labels)
        emb = self.cond(logsnr, class_labels)                    # (B, E)
        h = self.conv_in(self.stem(z_t))                         # (B, C0, res/f, res/f)
        saved = []
        for level in self.levels:
            h = level.encode(h, emb, saved)                      # ends at (B, D, grid, grid)
        B, D, G, _ = h.shape
        # contiguous: otherwise the sum keeps the transposed strides, and every LayerNorm and Linear of
        # the residual stream copies its input first.
        x = h.flatten(2).transpose(1, 2).contiguous() + self.pos_emb   # (B, N, D), N = grid^2
        for block in self.blocks:
            x = run_block(block, x, emb, self.grad_checkpointing)
        h = x.transpose(1, 2).reshape(B, D, G, G)                # (B, D, grid, grid)
        for level in reversed(self.levels):
            h = level.decode(h, emb, saved)                      # back up to (B, C0, res/f, res/f)
        return self.stem.inverse(self.head(h))                  # (B, C, res, res)


# ----------------------------------------------------------------------------------------------------
# Presets (hyper-parameters are our choice). Paper-scale: conv levels 128 -> 32 px at 128/256/512 (the
# wavelet stem absorbs the extra resolution), a 16x16 grid of 256 tokens, D = 2048, 32 blocks: about
# 1.9B parameters, the paper's "about 2B". "64" drops the 128-px level. "cpu64" is bench.py's
# transformer-heavy CPU network at 64x64: 2x2 patches, one conv level at 32x32, then 256 tokens of width
# 256 through 8 blocks, which hold about 90% of its FLOPs (7.7M parameters).

PRESETS: dict[str, UViTConfig] = {
    "tiny": UViTConfig(res=32, stem="patch", stem_factor=2, channels=(16,), num_blocks=(1,), width=32, depth=2,
                       head_dim=16, emb_dim=32, norm_groups=8),
    "small": UViTConfig(res=32, stem="patch", stem_factor=2, channels=(64,), num_blocks=(2,), width=160,
                        depth=6, head_dim=32, emb_dim=128),
    "cpu64": UViTConfig(res=64, stem="patch", stem_factor=2, channels=(64,), num_blocks=(1,), width=256, depth=8,
                        head_dim=64, emb_dim=128),
    "64": UViTConfig(res=64, stem="none", stem_factor=1, channels=(256, 512), num_blocks=(2, 2), token_res=16,
                     width=2048, depth=32, head_dim=128, emb_dim=1024, dropout=0.1, dropout_resolutions=(16,),
                     num_classes=1000),
    "128": UViTConfig(res=128, stem="none", stem_factor=1, channels=(128, 256, 512), num_blocks=(2, 2, 2),
                      token_res=16, width=2048, depth=32, head_dim=128, emb_dim=1024, dropout=0.1,
                      dropout_resolutions=(16,), num_classes=1000),
}
PRESETS["256"] = make_preset_config(PRESETS, "128", dict(res=256, stem="wavelet", stem_factor=2))
PRESETS["512"] = make_preset_config(PRESETS, "128", dict(res=512, stem="wavelet", stem_factor=4))


def preset_config(name: str, **overrides) -> UViTConfig:
    """A named preset with fields overridden, e.g. preset_config("small", num_classes=10)."""
    return make_preset_config(PRESETS, name, overrides)


if __name__ == "__main__":
    preset_cli(UViT, PRESETS, lambda cfg: f"conv levels at {conv_level_resolutions(cfg)} px, "
                                          f"{validate_uvit(cfg)}^2 tokens")
