"""
Shared helpers for the model tests (test_models.py, test_unet.py, test_uvit.py): the two networks by
name, the `seeded` fixture (a module opts in with pytestmark = pytest.mark.usefixtures("seeded")),
random weights for the layers that start at zero, the presets shrunk to a few channels, and attention
written out by hand from a module's weight tensors, the reference both attention tests compare with.
"""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import checkpoint
import unet
import uvit
from schedules import get_schedule

# name -> (model class, preset_config, PRESETS)
MODELS = {"unet": (unet.UNet, unet.preset_config, unet.PRESETS),
          "uvit": (uvit.UViT, uvit.preset_config, uvit.PRESETS)}


@pytest.fixture
def seeded():
    """Seed the global RNG that module construction and torch.randn draw from."""
    torch.manual_seed(0)


def build(cfg) -> nn.Module:
    """The network for a UNetConfig or a UViTConfig."""
    return unet.UNet(cfg) if isinstance(cfg, unet.UNetConfig) else uvit.UViT(cfg)


def randomize_zero_params(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Give the zero-initialised layers (output convs and projections, the U-ViT's position embedding)
    random weights, as training would, so the output depends on the inputs (at init it is exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def tiny_widths(cfg):
    """Same levels, stem, resolution, token grid, attention/dropout placement, with 8-16 channels, one
    ResBlock per level and (U-ViT) a 2-block transformer of width 32."""
    n = len(cfg.channels)
    if isinstance(cfg, unet.UNetConfig):
        return replace(cfg, channels=tuple(8 if i < n - 2 else 16 for i in range(n)), num_blocks=(1,) * n,
                       head_dim=8, emb_dim=16, norm_groups=8)
    return replace(cfg, channels=(8,) * (n - 1) + (16,), num_blocks=(1,) * n, width=32, depth=2, head_dim=16,
                   emb_dim=16, norm_groups=8)


def softmax_attention(tokens: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, heads: int,
                      gains: tuple | None = None) -> torch.Tensor:
    """Multi-head attention of (B, N, D) tokens, one head at a time: rows 0..D-1 of w_qkv make Q, rows
    D..2D-1 K, rows 2D..3D-1 V, and head h owns features h d .. (h+1) d - 1 of each (d = D / heads).
    Plain: softmax(Q K^T / sqrt(d)) V. With gains (g_q, g_k): each row of Q and K divided by its L2 norm,
    times the gains, and softmax(sqrt(d) Q K^T) V. Returns the heads side by side, (B, N, D)."""
    D = tokens.shape[-1]
    d = D // heads
    q_all, k_all, v_all = (tokens @ w.T + b for w, b in zip(w_qkv.split(D), b_qkv.split(D)))
    out = []
    for h in range(heads):
        q, k, v = (t[..., h * d:(h + 1) * d] for t in (q_all, k_all, v_all))
        if gains is None:
            logits = q @ k.transpose(-1, -2) / math.sqrt(d)
        else:
            q = q / q.square().sum(-1, keepdim=True).sqrt() * gains[0]
            k = k / k.square().sum(-1, keepdim=True).sqrt() * gains[1]
            logits = q @ k.transpose(-1, -2) * math.sqrt(d)
        weights = logits.exp() / logits.exp().sum(-1, keepdim=True)
        out.append(weights @ v)
    return torch.cat(out, dim=-1)


# ---------------------------------------------------------------------------------------- checkpoints

def write_checkpoint(run_dir, step, num_classes=0, class_names=None, res=8, seed=0, wrap=lambda sd: sd):
    """A checkpoint of a tiny U-Net through checkpoint.training_state, the path train.py takes. The EMA is
    the raw weights + 1, so a test can tell which of the two was loaded."""
    torch.manual_seed(seed)
    model = unet.UNet(unet.preset_config("tiny", res=res, num_classes=num_classes))
    ema = unet.UNet(model.config)
    ema.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    optimizer = torch.optim.AdamW(model.parameters())
    state = checkpoint.training_state(step=step, model_name="unet", model=model, ema=ema, optimizer=optimizer,
                             schedule=get_schedule("shifted", res), config=model.config, class_names=class_names,
                             data_state={}, rng_state={})
    state["model"], state["ema"] = wrap(state["model"]), wrap(state["ema"])
    checkpoint.save_checkpoint(run_dir, state, keep=100)
    return model
