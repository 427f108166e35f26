"""
The U-ViT of simple diffusion (Sec. 3, Fig. 7): convolutional levels down to 32x32, a transformer at 16x16.

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

Levels of the paper-scale "256" preset (B batch, C channels, H W spatial, N tokens, D width, E emb_dim):

    z_t (B, 3, 256, 256) --5/3 wavelet--> (B, 12, 128, 128) --conv3x3--> (B, 128, 128, 128)
    level 0  128x128, 128 ch: 2 ResBlocks ------------------ skips --> 2 ResBlocks (each concat a skip)
    level 1    64x64, 256 ch: 2 ResBlocks ------------------ skips --> 2 ResBlocks
    level 2    32x32, 512 ch: 2 ResBlocks ------------------ skips --> 2 ResBlocks
               avg-pool + 1x1 conv to D = 2048                            ^ 1x1 conv to 512 + nearest up
    tokens     16x16 = 256 tokens: + position embedding, 32 transformer blocks
    head: GroupNorm, SiLU, zero-initialised conv3x3 -> (B, 12, 128, 128) --inverse wavelet--> v_pred

Transformer block (per head: q, k, v of width head_dim; g_q, g_k learned, one per head_dim channel):
    q, k, v = W_qkv LN(x)
    q^ = g_q * q / |q|,   k^ = g_k * k / |k|                          (qk-norm: L2 per head, then gains)
    x = x + Dropout(W_o softmax(s q^ k^T) v),   s = sqrt(head_dim)      (without qk_norm: q k^T / sqrt(hd))
    h = SiLU(W_1 LN(x));   (scale, shift) = W_film emb
    x = x + Dropout(W_2 (h (1 + scale) + shift))
What follows the authors' appendix code (as its public port, lucidrains/denoising-diffusion-pytorch,
simple_diffusion.py, writes it): L2-normalised queries and keys with learned per-channel gains, the
stability device ViT-22B brought to large transformers (there as a LayerNorm of q and k): the logits stay
bounded however large q and k grow; conditioning only in the MLP, as a scale/shift of its (SiLU) hidden
layer with a zero-initialised W_film; no conditioning in the attention; LayerNorm before both.
What is ours: s = sqrt(head_dim) (the port fixes 8, which is sqrt(64)): for random directions q^ . k^
has standard deviation 1/sqrt(head_dim), so the logits start with unit spread, as plain attention's do
for unit-variance q and k; zero-initialised W_o and W_2 (every block starts as the identity and v_pred = 0);
biases on the linear layers; LayerNorms without affine (the linear layer after each absorbs it).
Symbols: z_t -> z_t, logSNR -> logsnr, v_hat -> v_pred, class label -> class_labels, g_q -> q_gain.

Choices the paper does not give: all hyper-parameters (PRESETS), a 4x MLP, head_dim 128, no final
LayerNorm (the up-sampling convs are followed by GroupNorms anyway), dropout on both residual branches of
every transformer block when the token grid's size is in `dropout_resolutions` (the port drops the
attention weights and the MLP's hidden layer instead).
`residual_skips=True` is SiD2's residual U-ViT: one skip per conv level, h = up(h - pooled) + h_l
(unet.Level). Its promise is that a body which returns its input leaves the level unchanged; for that to
hold at initialisation the learned position embedding starts at zero (a random one would make
h - pooled = pos_emb at the token level), so the whole residual network starts as head(conv_in(stem(z_t))).

Run `python uvit.py` for the preset table; tests: `pytest tests/test_uvit.py tests/test_models.py`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import (Conditioning, Level, Stem, check_common, conv_level_resolutions, encode, lists_to_tuples,
                  make_preset_config, preset_cli, run_block, zero_head)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention on (B, N, D) tokens, optionally with qk-norm (module docstring).
    The output projection W_o is zero-initialised: the residual branch starts at 0."""

    def __init__(self, width: int, head_dim: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = width // head_dim, head_dim
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)                    # output features: (q, k, v) x heads x hd
        self.proj = nn.Linear(width, width)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)
        self.q_gain = nn.Parameter(torch.ones(head_dim)) if qk_norm else None
        self.k_gain = nn.Parameter(torch.ones(head_dim)) if qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(self.norm(x)).view(B, N, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                      # 3 x (B, heads, N, hd)
        scale = None                                              # sdpa's default, 1 / sqrt(hd)
        if self.q_gain is not None:
            q, k = F.normalize(q, dim=-1) * self.q_gain, F.normalize(k, dim=-1) * self.k_gain
            scale = math.sqrt(self.head_dim)
        h = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, heads, N, hd)
        return self.proj(h.transpose(1, 2).reshape(B, N, D))     # (B, N, D)


class ConditionedMLP(nn.Module):
    """LN, W_1, SiLU, the noise/class scale/shift of the hidden layer, W_2 (zero-initialised)."""

    def __init__(self, width: int, emb_dim: int, mlp_ratio: int):
        super().__init__()
        hidden = mlp_ratio * width
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.film = nn.Linear(emb_dim, 2 * hidden)                # zero: a plain MLP at the start
        for layer in (self.film, self.fc2):
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.fc1(self.norm(x)))                        # (B, N, hidden)
        scale, shift = self.film(emb)[:, None].chunk(2, dim=-1)   # 2 x (B, 1, hidden)
        return self.fc2(torch.addcmul(shift, h, 1 + scale))       # (B, N, D)


class TransformerBlock(nn.Module):
    """x + Dropout(attention(x)), then + Dropout(MLP(x, emb)); starts as the identity."""

    def __init__(self, width: int, emb_dim: int, head_dim: int, mlp_ratio: int, dropout: float,
                 qk_norm: bool = True):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.attn = SelfAttention(width, head_dim, qk_norm)
        self.mlp = ConditionedMLP(width, emb_dim, mlp_ratio)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(x))                        # (B, N, D)
        return x + self.dropout(self.mlp(x, emb))


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
    qk_norm: bool = True                   # L2-normalised queries and keys with learned gains (appendix)
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
    levels = len(cfg.channels)
    factor = cfg.stem_factor * 2 ** levels
    what = f"stem x{cfg.stem_factor}, then {levels} conv levels x{2 ** levels} down to the token grid"
    check_common(cfg, factor, what)
    grid = cfg.res // factor
    if cfg.token_res and grid != cfg.token_res:
        raise ValueError(f"UViTConfig: res={cfg.res} / down-sampling factor {factor} ({what}) gives a "
                         f"{grid}x{grid} token grid, but token_res={cfg.token_res}; nearest valid res: "
                         f"{cfg.token_res * factor} (or change stem_factor/channels, or token_res=0 to follow res)")
    if cfg.width % cfg.head_dim:
        raise ValueError(f"UViTConfig: width={cfg.width} is not a multiple of head_dim={cfg.head_dim}")
    return grid


class UViT(nn.Module):
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
                  cfg.dropout if r in cfg.dropout_resolutions else 0.0, False, cfg.head_dim, g, cfg.residual_skips,
                  cfg.grad_checkpointing)
            for i, r in enumerate(conv_level_resolutions(cfg)))
        self.pos_emb = nn.Parameter(torch.zeros(1, self.grid ** 2, D))   # learned, (1, N, D); zero: see docstring
        token_dropout = cfg.dropout if self.grid in cfg.dropout_resolutions else 0.0
        self.blocks = nn.ModuleList(TransformerBlock(D, cfg.emb_dim, cfg.head_dim, cfg.mlp_ratio, token_dropout,
                                                     cfg.qk_norm) for _ in range(cfg.depth))
        self.head = zero_head(ch[0], stem_channels, g)

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, class_labels: torch.Tensor | None = None):
        h, emb, saved = encode(self, z_t, logsnr, class_labels)  # ends at (B, D, grid, grid)
        B, D, G, _ = h.shape
        # contiguous: otherwise the sum keeps the transposed strides, and every LayerNorm and Linear of
        # the residual stream copies its input first.
        x = h.flatten(2).transpose(1, 2).contiguous() + self.pos_emb   # (B, N, D), N = grid^2
        for block in self.blocks:
            x = run_block(block, x, emb, self.config.grad_checkpointing)
        h = x.transpose(1, 2).reshape(B, D, G, G)                # (B, D, grid, grid)
        for level in reversed(self.levels):
            h = level.decode(h, emb, saved)                      # back up to (B, C0, res/f, res/f)
        return self.stem.inverse(self.head(h).float())          # (B, C, res, res); fp32 under autocast


# ----------------------------------------------------------------------------------------------------
# Presets (hyper-parameters are our choice). Paper-scale: conv levels 128 -> 32 px at 128/256/512 (the
# wavelet stem absorbs the extra resolution), a 16x16 grid of 256 tokens, D = 2048, 32 blocks: 2.19B
# parameters (0.54B of them in the blocks' W_film), the paper's "about 2B". "64" drops the 128-px level.
# "cpu64" is bench.py's transformer-heavy CPU network at 64x64: 2x2 patches, one conv level at 32x32,
# then 256 tokens of width 256 through 8 blocks, which hold about 90% of its FLOPs.

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
