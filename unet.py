"""
The U-Net of simple diffusion (Sec. 3, Fig. 7): convolutional levels, attention only at low resolution.

The idea. The denoiser maps a noisy image z_t and its noise level logsnr to v_pred. A U-Net does it in
levels: ResBlocks at full size, average-pool to half size, more ResBlocks, ... then back up, each level
of the way up concatenating the features saved at the same size on the way down (skip connections).
Simple diffusion's findings are about *where* the compute goes: (1) scale the 16x16 level rather than the
expensive high-resolution ones; (2) self-attention only at 16x16 and below, where tokens are few; (3)
dropout only on the low-resolution levels; (4) no convolutions at full resolution: an invertible first
layer (space-to-depth "patching", or the 5/3 wavelet transform) turns (C, H, W) into (4C, H/2, W/2)
losslessly, so 512x512 costs about what 256x256 does. uvit.py reuses every block defined here.

Levels of the "small" preset at res 32 (B batch, C channels, H W spatial, N = H W positions):

    z_t (B, 3, 32, 32) --5/3 wavelet--> (B, 12, 16, 16) --conv3x3--> (B, 48, 16, 16)
    level 0  16x16,  48 ch: 2 ResBlocks -------------------- skips --> 2 ResBlocks (each concat a skip)
                 avg-pool + 1x1 conv |                                 ^ 1x1 conv + nearest up
    level 1    8x8,  96 ch: 2 ResBlocks+attention -------- skips --> 2 ResBlocks+attention
                 avg-pool + 1x1 conv |                                 ^ 1x1 conv + nearest up
    level 2    4x4, 128 ch: 1 ResBlock+attn -> middle: ResBlock+attn, ResBlock -> 1 ResBlock+attn
    head: GroupNorm, SiLU, zero-initialised conv3x3 -> (B, 12, 16, 16) --inverse wavelet--> v_pred (B, 3, 32, 32)

Equations and conventions:
    5/3 (LeGall, JPEG2000) wavelet by lifting, per axis (section "avoiding high resolution feature maps"):
        high[n] = x[2n+1] - (x[2n] + x[2n+2]) / 2        low[n] = x[2n] + (high[n-1] + high[n]) / 4
        (mirror extension at the borders; the inverse runs the two steps backwards, so it is exact)
    more levels as that section's DWT figure draws them (dyadic): level l+1 transforms only level l's
        LL band; earlier high bands are space-to-depth'd to the coarsest size (dyadic_wavelet53)
    attention: softmax(Q K^T / sqrt(head_dim)) V per head, Q K V from one 1x1 conv of GroupNorm(h)
    logsnr embedding: [sin(w_k logsnr), cos(w_k logsnr)], w_k geometric from pi/50 to 2 pi
    adaptive group norm in every ResBlock:  h = GroupNorm(h) * (1 + scale) + shift,  (scale, shift) = W emb
Symbols: z_t -> z_t, lambda_t / logSNR -> logsnr, v_hat -> v_pred, class label y -> class_labels.

Choices the paper does not give (all hyper-parameters are ours, see PRESETS):
- logsnr features: the slowest sinusoid (pi/50) is monotone on [-25, 25] (+-15 plus shifts up to 1024 px),
  the fastest has period 1 logsnr unit, fine enough to tell sampling steps apart.
- patching is parameter-free space-to-depth then a 3x3 conv (which can express the paper's learned
  stride-p conv and also sees the neighbouring patches), its exact inverse after a 3x3 output conv.
  The 5/3 bands keep the JPEG2000 lifting scale (LL has gain 1); channel layout: dyadic_wavelet53.
- one skip per down ResBlock, concatenated per up ResBlock; channels change only in the 1x1 convs that
  go with average pooling / nearest up-sampling. The class embedding (num_classes + 1 rows, the last
  the null label of classifier-free guidance) is added to the logsnr embedding.
- zero-initialised output convs: every block starts as the identity and the network outputs v_pred = 0.
- `residual_skips=True` is SiD2's residual U-Net: one skip per level, h = up(h - pooled) + h_l (Level).

Run `python unet.py` for the preset table; tests: `pytest tests/test_unet.py tests/test_models.py`.
"""
import argparse
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

LOGSNR_RANGE = 25.0  # |logsnr| up to which the slowest sinusoid stays monotone


# ----------------------------------------------------------------------------------------------------
# Invertible first layers: space-to-depth and the 5/3 wavelet. Pure functions, exact inverses.

def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """Each p x p patch becomes p^2 channels: out[:, c p^2 + i p + j, y, x] = in[:, c, y p + i, x p + j]."""
    return F.pixel_unshuffle(x, p)  # (B, C p^2, H/p, W/p)


def depth_to_space(x: torch.Tensor, p: int) -> torch.Tensor:
    """Exact inverse of space_to_depth (a permutation of entries)."""
    return F.pixel_shuffle(x, p)  # (B, C, H p, W p)


def _neighbour(a: torch.Tensor, step: int) -> torch.Tensor:
    """a[n + step] (step = +-1) along the last axis, the end entry repeated (whole-sample mirror)."""
    return torch.cat([a[..., 1:], a[..., -1:]] if step > 0 else [a[..., :1], a[..., :-1]], dim=-1)


def lift53(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One 5/3 wavelet step along the last axis (even length): (low, high), each half as long.
    Mirror extension x[-1] = x[1], x[2N] = x[2N-2] is what makes high[-1] = high[0] at the start."""
    even, odd = x[..., 0::2], x[..., 1::2]
    high = odd - 0.5 * (even + _neighbour(even, 1))         # predict: odd samples from their neighbours
    low = even + 0.25 * (_neighbour(high, -1) + high)       # update: keeps the running mean of x
    return low, high


def unlift53(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Inverse of lift53: undo the update, then the prediction, then interleave."""
    even = low - 0.25 * (_neighbour(high, -1) + high)
    odd = high + 0.5 * (even + _neighbour(even, 1))
    return torch.stack([even, odd], dim=-1).flatten(-2)      # (..., 2N)


def wavelet53(x: torch.Tensor) -> torch.Tensor:
    """2D 5/3 wavelet, one level: (B, C, H, W) -> (B, 4C, H/2, W/2), bands (LL, LH, HL, HH) of each
    input channel next to each other (the layout of space_to_depth with p = 2). Band XY is X-pass along
    W (horizontal) and Y-pass along H (vertical), the JPEG2000 naming."""
    low, high = lift53(x)                                    # along W: 2 x (B, C, H, W/2)
    ll, lh = lift53(low.transpose(-1, -2))                   # along H: 2 x (B, C, W/2, H/2)
    hl, hh = lift53(high.transpose(-1, -2))
    bands = torch.stack([ll, lh, hl, hh], dim=2)             # (B, C, 4, W/2, H/2)
    return bands.transpose(-1, -2).flatten(1, 2)             # (B, 4C, H/2, W/2)


def inverse_wavelet53(y: torch.Tensor) -> torch.Tensor:
    """Exact inverse of wavelet53: (B, 4C, H/2, W/2) -> (B, C, H, W)."""
    ll, lh, hl, hh = y.unflatten(1, (-1, 4)).transpose(-1, -2).unbind(2)   # 4 x (B, C, W/2, H/2)
    low = unlift53(ll, lh).transpose(-1, -2)                 # (B, C, H, W/2)
    high = unlift53(hl, hh).transpose(-1, -2)
    return unlift53(low, high)                               # (B, C, H, W)


def dyadic_wavelet53(x: torch.Tensor, levels: int) -> torch.Tensor:
    """`levels` levels of the 5/3 wavelet, each on the previous level's LL band only (the paper's DWT
    figure). (B, C, H, W) -> (B, C 4^L, H/2^L, W/2^L), L = levels. The 4^L channels of input channel c
    start at c 4^L and hold, in order: LL, LH, HL, HH of level L; then, for l = L-1 down to 1, level l's
    LH, HL and HH, each space_to_depth'd by p = 2^(L-l) into p^2 channels (index i p + j = the entry at
    offset (i, j) of each p x p patch). One level is exactly wavelet53."""
    if levels == 1:
        return wavelet53(x)                                  # (B, 4C, H/2, W/2)
    bands = wavelet53(x).unflatten(1, (-1, 4))               # (B, C, 4, H/2, W/2)
    coarse = dyadic_wavelet53(bands[:, :, 0], levels - 1)    # (B, C 4^(L-1), H/2^L, W/2^L)
    high = space_to_depth(bands[:, :, 1:].flatten(1, 2), 2 ** (levels - 1))   # (B, 3C 4^(L-1), ...)
    per_channel = [t.unflatten(1, (x.shape[1], -1)) for t in (coarse, high)]  # (B, C, ., H/2^L, W/2^L)
    return torch.cat(per_channel, dim=2).flatten(1, 2)       # (B, C 4^L, H/2^L, W/2^L)


def inverse_dyadic_wavelet53(y: torch.Tensor, levels: int) -> torch.Tensor:
    """Exact inverse of dyadic_wavelet53: (B, C 4^L, h, w) -> (B, C, h 2^L, w 2^L)."""
    if levels == 1:
        return inverse_wavelet53(y)
    coarse, high = y.unflatten(1, (-1, 4 ** levels)).split([4 ** (levels - 1), 3 * 4 ** (levels - 1)], dim=2)
    ll = inverse_dyadic_wavelet53(coarse.flatten(1, 2), levels - 1)                     # (B, C, 2h, 2w)
    high = depth_to_space(high.flatten(1, 2), 2 ** (levels - 1)).unflatten(1, (-1, 3))  # (B, C, 3, 2h, 2w)
    return inverse_wavelet53(torch.cat([ll[:, :, None], high], dim=2).flatten(1, 2))   # (B, C, H, W)


class Stem(nn.Module):
    """The parameter-free first layer and its inverse at the output: "patch" (space-to-depth), "wavelet"
    (log2(factor) dyadic 5/3 levels) or "none" (factor 1); bands/patches go onto channels: C -> C factor^2."""

    def __init__(self, kind: str, factor: int):
        super().__init__()
        self.factor, self.levels = factor, (int(math.log2(factor)) if kind == "wavelet" else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, C, H, W) -> (B, C f^2, H/f, W/f)
        return dyadic_wavelet53(x, self.levels) if self.levels else space_to_depth(x, self.factor)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:     # (B, C f^2, H/f, W/f) -> (B, C, H, W)
        return inverse_dyadic_wavelet53(x, self.levels) if self.levels else depth_to_space(x, self.factor)


# ----------------------------------------------------------------------------------------------------
# Conditioning: logsnr (and class) -> one embedding vector per example.

def logsnr_features(logsnr: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """Sinusoidal features, frequencies geometric from pi / (2 LOGSNR_RANGE) to 2 pi (the module
    docstring says why). (B,) -> (B, 2 num_freqs)."""
    w = torch.exp(torch.linspace(math.log(math.pi / (2 * LOGSNR_RANGE)), math.log(2 * math.pi), num_freqs,
                                 device=logsnr.device))
    angles = logsnr.float()[:, None] * w                     # (B, num_freqs)
    return torch.cat([angles.sin(), angles.cos()], dim=1)    # (B, 2 num_freqs)


class Conditioning(nn.Module):
    """emb = MLP(features(logsnr)) + class_embedding[label]; returns SiLU(emb), which every block's
    scale/shift projection consumes (computing the SiLU once instead of per block)."""

    def __init__(self, emb_dim: int, num_classes: int, num_freqs: int = 64):
        super().__init__()
        self.num_freqs, self.num_classes = num_freqs, num_classes
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None  # + null row

    def forward(self, logsnr: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.mlp(logsnr_features(logsnr, self.num_freqs))  # (B, E)
        if self.class_emb is not None:
            if class_labels is None:                             # None means "unconditional" = null
                class_labels = torch.full_like(logsnr, self.num_classes, dtype=torch.long)
            emb = emb + self.class_emb(class_labels)
        return F.silu(emb)


def check_inputs(model: nn.Module, z_t: torch.Tensor, logsnr: torch.Tensor, class_labels: torch.Tensor | None):
    """Shape and label checks shared by UNet and UViT; returns logsnr as (B,). Skipped while
    torch.compile traces (the label range check would sync the device and break the graph)."""
    cfg, name = model.config, type(model).__name__
    logsnr = logsnr.expand(z_t.shape[0]) if logsnr.dim() == 0 else logsnr
    if torch.compiler.is_compiling():
        return logsnr
    if z_t.dim() != 4 or z_t.shape[1] != cfg.in_channels or tuple(z_t.shape[2:]) != (cfg.res, cfg.res):
        raise ValueError(f"{name}: z_t has shape {tuple(z_t.shape)}, expected (B, {cfg.in_channels}, {cfg.res}, "
                         f"{cfg.res}); build the model with in_channels/res matching the data")
    if logsnr.shape != (z_t.shape[0],):
        raise ValueError(f"{name}: logsnr has shape {tuple(logsnr.shape)}, expected ({z_t.shape[0]},), one per image")
    if class_labels is not None and class_labels.device.type != "meta":   # meta: FLOP counting
        if class_labels.shape != (z_t.shape[0],) or class_labels.dtype != torch.long:
            raise ValueError(f"{name}: class_labels must be a (B,) long tensor, got {tuple(class_labels.shape)} "
                             f"{class_labels.dtype}")
        lo, hi = torch.stack(torch.aminmax(class_labels)).tolist()    # one host sync, not two
        if lo < 0 or hi > cfg.num_classes:
            valid = (f"0..{cfg.num_classes - 1}, or {cfg.num_classes} for the null label" if cfg.num_classes
                     else "None (the model is unconditional, num_classes=0)")
            raise ValueError(f"{name}: class label {lo if lo < 0 else hi} out of range; valid labels: {valid}")
    return logsnr


# ----------------------------------------------------------------------------------------------------
# Blocks.

def norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides the channels."""
    return nn.GroupNorm(math.gcd(channels, groups), channels)


class Attention(nn.Module):
    """Pre-norm residual multi-head self-attention over the H W positions: x + proj(softmax(Q K^T /
    sqrt(head_dim)) V). The 1x1 conv's 3C channels are (q, k, v) x heads x head_dim, in that order. One copy
    makes head_dim the contiguous axis, which the fused kernels of scaled_dot_product_attention need
    (flash on GPU and CPU; with a strided last axis the CPU falls back to the slower math path)."""

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = channels // head_dim
        self.norm = norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)   # starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)  # (B, 3, heads, hd, N)
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)           # 3 x (B, heads, N, hd)
        h = F.scaled_dot_product_attention(q, k, v)                      # (B, heads, N, hd)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))   # (B, C, H, W)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, adaptive GroupNorm (scale/shift from the embedding)-SiLU-dropout-conv3x3,
    plus the (1x1-projected if needed) input; optionally followed by self-attention. The second conv is
    zero-initialised, so the block starts as its skip path."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0, attn: bool = False,
                 head_dim: int = 64, groups: int = 32):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()   # a module only where it acts
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out, head_dim, groups) if attn else nn.Identity()
        nn.init.zeros_(self.conv2.weight), nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                              # (B, C_out, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)     # 2 x (B, C_out, 1, 1)
        h = F.silu(torch.addcmul(shift, self.norm2(h), 1 + scale))        # adaptive group norm
        h = self.conv2(self.dropout(h))
        return self.attn(self.skip(x) + h)


def run_block(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """block(h, emb), recomputed in the backward pass instead of storing its activations if asked."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, h, emb, use_reentrant=False)
    return block(h, emb)


class Level(nn.Module):
    """One resolution of the U: ResBlocks on the way down (`encode`), ResBlocks on the way up (`decode`),
    and, unless it is the lowest level, the change of size to the level below: average pooling then a
    1x1 conv to its channels (pooling first: 4x fewer positions for the conv), and back with a 1x1 conv
    then nearest up-sampling. Two kinds of skip connection:
    - U-Net (Fig. 7): every down block's output is saved and concatenated to one up block's input.
    - residual (SiD2, `residual=True`): one skip per level; h_l = blocks(h), pooled = down(h_l); on the
      way up h = up(h - pooled) + h_l: the levels below add a correction (none if they return `pooled`).
    `checkpointing`: recompute each block in the backward pass instead of storing its activations."""

    def __init__(self, channels: int, next_channels: int | None, num_blocks: int, emb_dim: int,
                 dropout: float, attn: bool, head_dim: int, groups: int, residual: bool, checkpointing: bool):
        super().__init__()
        self.residual, self.checkpointing = residual, checkpointing
        block = dict(emb_dim=emb_dim, dropout=dropout, attn=attn, head_dim=head_dim, groups=groups)
        up_in = channels if residual else 2 * channels
        self.down_blocks = nn.ModuleList(ResBlock(channels, channels, **block) for _ in range(num_blocks))
        self.up_blocks = nn.ModuleList(ResBlock(up_in, channels, **block) for _ in range(num_blocks))
        self.down = None if next_channels is None else nn.Conv2d(channels, next_channels, 1, bias=False)
        self.up = None if next_channels is None else nn.Conv2d(next_channels, channels, 1, bias=False)   # up(0) = 0

    def encode(self, h: torch.Tensor, emb: torch.Tensor, saved: list) -> torch.Tensor:
        for block in self.down_blocks:
            h = run_block(block, h, emb, self.checkpointing)               # (B, C, H, W)
            if not self.residual:
                saved.append(h)
        if self.down is None:
            return h
        pooled = self.down(F.avg_pool2d(h, 2))                             # (B, C_next, H/2, W/2)
        if self.residual:
            saved.append((h, pooled))
        return pooled

    def decode(self, h: torch.Tensor, emb: torch.Tensor, saved: list) -> torch.Tensor:
        if self.up is not None:
            if self.residual:
                h_l, pooled = saved.pop()
                h = h - pooled                                             # what the levels below added
            h = F.interpolate(self.up(h), scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
            if self.residual:
                h = h + h_l
        for block in self.up_blocks:
            if not self.residual:
                h = torch.cat([h, saved.pop()], dim=1)                     # (B, 2C, H, W)
            h = run_block(block, h, emb, self.checkpointing)               # (B, C, H, W)
        return h


# ----------------------------------------------------------------------------------------------------
# Configuration, validation, the model.

@dataclass
class UNetConfig:
    res: int = 32                          # image size (square)
    in_channels: int = 3
    num_classes: int = 0                   # 0 = unconditional; else labels 0..n-1 plus null label n
    stem: str = "patch"                    # first layer: "patch" (space-to-depth) | "wavelet" (5/3) | "none"
    stem_factor: int = 2                   # its down-sampling (1, 2, 4, ...; a power of two for "wavelet")
    channels: tuple = (48, 96, 128)        # per level, highest resolution first
    num_blocks: tuple = (2, 2, 1)          # ResBlocks per level on the way down (as many on the way up)
    attn_resolutions: tuple = (8, 4)       # feature-map sizes with attention (the middle always has it)
    head_dim: int = 32                     # attention heads = channels / head_dim
    emb_dim: int = 128                     # width of the logsnr/class embedding
    dropout: float = 0.0
    dropout_resolutions: tuple = (16, 8)   # feature-map sizes whose ResBlocks use dropout
    norm_groups: int = 32
    residual_skips: bool = False           # SiD2's one-skip-per-level residual U-Net
    grad_checkpointing: bool = False

    def __post_init__(self):
        lists_to_tuples(self)


def lists_to_tuples(cfg) -> None:
    """A config rebuilt from JSON or a CLI may carry lists; store tuples so configs compare equal."""
    for f in fields(cfg):
        if isinstance(getattr(cfg, f.name), list):
            setattr(cfg, f.name, tuple(getattr(cfg, f.name)))


def conv_level_resolutions(cfg) -> list[int]:
    """Feature-map size of each conv level: res / stem_factor, halved per level."""
    return [cfg.res // (cfg.stem_factor * 2 ** i) for i in range(len(cfg.channels))]


def check_common(cfg, factor: int, what: str) -> None:
    """Checks shared by UNetConfig and UViTConfig; `factor` is the total down-sampling (`what` says how)."""
    name, f = type(cfg).__name__, cfg.stem_factor
    if f < 1 or {"patch": False, "wavelet": f & (f - 1), "none": f != 1}.get(cfg.stem, True):
        raise ValueError(f"{name}: stem={cfg.stem!r} with stem_factor={f}; choose 'patch' (any factor), "
                         f"'wavelet' (a power of two) or 'none' (factor 1)")
    if len(cfg.channels) != len(cfg.num_blocks) or not cfg.channels:
        raise ValueError(f"{name}: channels {cfg.channels} and num_blocks {cfg.num_blocks} need one entry per level")
    if cfg.in_channels < 1 or cfg.num_classes < 0:
        raise ValueError(f"{name}: in_channels must be >= 1 and num_classes >= 0")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"{name}: dropout={cfg.dropout} must be in [0, 1)")
    if cfg.res % factor or cfg.res < factor:
        raise ValueError(f"{name}: res={cfg.res} is not a multiple of the model's total down-sampling factor "
                         f"{factor} ({what}); nearest valid res: {max(1, round(cfg.res / factor)) * factor} "
                         f"(change --res, or stem_factor/channels)")


def validate_unet(cfg: UNetConfig) -> None:
    levels = len(cfg.channels)
    check_common(cfg, cfg.stem_factor * 2 ** (levels - 1),
                 f"stem x{cfg.stem_factor}, then {levels - 1} halvings over {levels} levels")
    resolutions = conv_level_resolutions(cfg)
    for c, r in zip(cfg.channels, resolutions):
        if (r in cfg.attn_resolutions or r == resolutions[-1]) and c % cfg.head_dim:
            raise ValueError(f"UNetConfig: level {r}x{r} has attention but {c} channels are not a multiple "
                             f"of head_dim={cfg.head_dim}")


def zero_head(channels: int, out_channels: int, groups: int) -> nn.Sequential:
    """GroupNorm, SiLU, conv3x3 with zero weights and bias: the network outputs v_pred = 0 at init."""
    head = nn.Sequential(norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
    nn.init.zeros_(head[-1].weight), nn.init.zeros_(head[-1].bias)
    return head


def encode(model: nn.Module, z_t, logsnr, class_labels) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The way down, shared by UNet and UViT: (lowest features, embedding (B, E), skips for the way up)."""
    logsnr = check_inputs(model, z_t, logsnr, class_labels)
    emb = model.cond(logsnr, class_labels)                       # (B, E)
    h, saved = model.conv_in(model.stem(z_t)), []                # (B, C0, res/f, res/f)
    for level in model.levels:
        h = level.encode(h, emb, saved)                          # each level halves H and W
    return h, emb, saved


class UNet(nn.Module):
    """forward(z_t (B, C, H, W), logsnr (B,), class_labels (B,) long or None) -> v_pred (B, C, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        validate_unet(cfg)
        self.config, self.num_classes = cfg, cfg.num_classes
        resolutions = conv_level_resolutions(cfg)
        ch, g = cfg.channels, cfg.norm_groups
        stem_channels = cfg.in_channels * cfg.stem_factor ** 2
        self.stem = Stem(cfg.stem, cfg.stem_factor)
        self.cond = Conditioning(cfg.emb_dim, cfg.num_classes)
        self.conv_in = nn.Conv2d(stem_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            Level(ch[i], ch[i + 1] if i + 1 < len(ch) else None, cfg.num_blocks[i], cfg.emb_dim,
                  cfg.dropout if r in cfg.dropout_resolutions else 0.0, r in cfg.attn_resolutions,
                  cfg.head_dim, g, cfg.residual_skips, cfg.grad_checkpointing)
            for i, r in enumerate(resolutions))
        mid_dropout = cfg.dropout if resolutions[-1] in cfg.dropout_resolutions else 0.0   # lowest level's
        self.middle = nn.ModuleList(ResBlock(ch[-1], ch[-1], cfg.emb_dim, mid_dropout, attn, cfg.head_dim, g)
                                    for attn in (True, False))          # ResBlock + attention, ResBlock
        self.head = zero_head(ch[0], stem_channels, g)

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, class_labels: torch.Tensor | None = None):
        h, emb, saved = encode(self, z_t, logsnr, class_labels)  # down to (B, C_last, r_last, r_last)
        for block in self.middle:
            h = run_block(block, h, emb, self.config.grad_checkpointing)
        for level in reversed(self.levels):
            h = level.decode(h, emb, saved)                      # back up to (B, C0, res/f, res/f)
        return self.stem.inverse(self.head(h).float())          # (B, C, res, res); fp32 under autocast


# ----------------------------------------------------------------------------------------------------
# Presets (all ours). "tiny": tests; "small": the CPU demo; "small64"/"small128": scenes at 64/128 px (one more
# level). Paper-scale 128/256/512 share the conv levels 128..8 px; only the stem differs: the paper's point.

PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(res=32, stem="patch", stem_factor=2, channels=(16, 32), num_blocks=(1, 1),
                       attn_resolutions=(8,), head_dim=16, emb_dim=32, norm_groups=8),
    "small": UNetConfig(res=32, stem="wavelet", stem_factor=2, channels=(48, 96, 128), num_blocks=(2, 2, 1),
                        attn_resolutions=(8, 4), head_dim=32, emb_dim=128),
    "64": UNetConfig(res=64, stem="none", stem_factor=1, channels=(128, 256, 768, 768), num_blocks=(2, 2, 8, 2),
                     attn_resolutions=(16, 8), head_dim=64, emb_dim=1024, dropout=0.1,
                     dropout_resolutions=(16, 8), num_classes=1000),
    "128": UNetConfig(res=128, stem="none", stem_factor=1, channels=(128, 256, 512, 1024, 1024),
                      num_blocks=(2, 2, 2, 8, 2), attn_resolutions=(16, 8), head_dim=128, emb_dim=1024,
                      dropout=0.1, dropout_resolutions=(16, 8), num_classes=1000),
}
PRESETS["small64"] = replace(PRESETS["small"], res=64, channels=(32, 64, 96, 128), num_blocks=(1, 1, 2, 1))
PRESETS["small128"] = replace(PRESETS["small64"], res=128)
PRESETS["256"] = replace(PRESETS["128"], res=256, stem="wavelet", stem_factor=2)
PRESETS["512"] = replace(PRESETS["128"], res=512, stem="wavelet", stem_factor=4)


def make_preset_config(presets: dict, name: str, overrides: dict):
    """presets[name] with fields replaced; unknown names/fields give a one-line ValueError."""
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    cfg, known = presets[name], {f.name for f in fields(presets[name])}
    if bad := sorted(set(overrides) - known):
        raise ValueError(f"unknown {type(cfg).__name__} field(s) {', '.join(bad)}; valid: {', '.join(sorted(known))}")
    return replace(cfg, **overrides)


def preset_config(name: str, **overrides) -> UNetConfig:
    """A named preset with fields overridden, e.g. preset_config("small", res=64, num_classes=10)."""
    return make_preset_config(PRESETS, name, overrides)


def model_stats(model_cls, cfg) -> tuple[int, float]:
    """(parameters, forward FLOPs per image; a multiply-add is 2 FLOPs), counted on the meta device."""
    with torch.device("meta"):
        model, z_t = model_cls(cfg), torch.zeros(1, cfg.in_channels, cfg.res, cfg.res)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(z_t, z_t.new_zeros(1))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def preset_cli(model_cls, presets: dict, describe) -> None:
    """`python unet.py` / `python uvit.py`: the preset table, or one preset after --res."""
    p = argparse.ArgumentParser(description=f"{model_cls.__name__} presets: parameters, forward GFLOPs per image.")
    p.add_argument("--preset", choices=list(presets), default=None)
    p.add_argument("--res", type=int, default=None, help="override the preset's resolution")
    args = p.parse_args()
    if args.preset is None:
        print("| preset | res | stem | params | fwd GFLOPs/img |\n| --- | --- | --- | --- | --- |")
        for name, cfg in presets.items():
            params, flops = model_stats(model_cls, cfg)
            print(f"| {name} | {cfg.res} | {cfg.stem} x{cfg.stem_factor} | {params / 1e6:,.1f}M | {flops / 1e9:,.2f} |")
        return
    try:
        cfg = make_preset_config(presets, args.preset, {} if args.res is None else {"res": args.res})
        params, flops = model_stats(model_cls, cfg)
        print(f"{asdict(cfg)}\n{describe(cfg)}; {params / 1e6:.2f}M parameters; {flops / 1e9:.3f} fwd GFLOPs/image")
    except ValueError as e:
        p.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    preset_cli(UNet, PRESETS, lambda cfg: f"levels at {conv_level_resolutions(cfg)} px")
