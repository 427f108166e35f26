"""
Tests for uvit.py's own parts: the transformer block against a reference written out in the test from
its weight tensors (LayerNorm, per-head softmax attention with and without qk-norm, the MLP's scale and
shift of its hidden layer), the tokens entering the transformer (the pooled feature map in row-major
order plus the position embedding), and a block's parameters and FLOPs against their closed forms.
What both networks share is tested in test_models.py.
"""
from dataclasses import replace

import pytest
import torch

from conftest import randomize_zero_params, softmax_attention, tiny_widths
from unet import model_stats
from uvit import TransformerBlock, UViT, preset_config

pytestmark = pytest.mark.usefixtures("seeded")


def layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm without affine over the last axis."""
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()


@pytest.mark.parametrize("qk_norm", [True, False])
def test_transformer_block_matches_hand_written_reference(qk_norm):
    """x1 = x + W_o attention(LN(x)); out = x1 + W_2 (SiLU(W_1 LN(x1)) (1 + scale) + shift), with
    (scale, shift) = W_film emb; 2 heads of width 8 over 5 tokens. The gains get values away from 1 so
    that leaving them out, or scaling by 1/sqrt(d) instead of sqrt(d), fails."""
    D, E, heads = 16, 8, 2
    block = randomize_zero_params(TransformerBlock(D, E, head_dim=8, mlp_ratio=4, dropout=0.0,
                                                   qk_norm=qk_norm)).double()
    attn, mlp = block.attn, block.mlp
    gains = None
    if qk_norm:
        with torch.no_grad():
            attn.q_gain.uniform_(0.5, 3.0), attn.k_gain.uniform_(0.5, 3.0)
        gains = (attn.q_gain, attn.k_gain)
    x, emb = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, E, dtype=torch.float64)
    heads_out = softmax_attention(layer_norm(x), attn.qkv.weight, attn.qkv.bias, heads, gains)
    x1 = x + heads_out @ attn.proj.weight.T + attn.proj.bias
    pre = layer_norm(x1) @ mlp.fc1.weight.T + mlp.fc1.bias
    hidden = pre * torch.sigmoid(pre)                                          # SiLU
    scale, shift = (emb @ mlp.film.weight.T + mlp.film.bias)[:, None].split(4 * D, dim=-1)
    expected = x1 + (hidden * (1 + scale) + shift) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-10, atol=1e-12)


def test_tokens_are_the_pooled_map_plus_the_position_embedding():
    """The transformer's input is the last conv level's pooled (B, D, G, G) map read in row-major order
    (token n = row n // G, column n % G) plus pos_emb, and v_pred depends on pos_emb."""
    model = randomize_zero_params(UViT(preset_config("tiny"))).eval()
    seen = {}
    model.levels[-1].down.register_forward_hook(lambda m, inputs, output: seen.__setitem__("pooled", output))
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("tokens", args[0]))
    z_t, logsnr = torch.randn(2, 3, 32, 32), torch.randn(2)
    v_pred = model(z_t, logsnr)
    pooled = seen["pooled"]
    G = pooled.shape[-1]
    expected = torch.stack([pooled[:, :, n // G, n % G] for n in range(G * G)], dim=1) + model.pos_emb
    torch.testing.assert_close(seen["tokens"], expected)
    with torch.no_grad():
        model.pos_emb.mul_(-1)
    assert (model(z_t, logsnr) - v_pred).abs().max() > 1e-4


def test_transformer_block_params_and_flops_match_closed_form():
    """Per block: qkv (D x 3D), W_o (D x D), W_1 (D x 4D), W_2 (4D x D), W_film (E x 8D), all with
    biases (17 D), and the two qk-norm gains (2 head_dim). Forward FLOPs at 2 per multiply-add:
    2 N (12 D^2) for the projections, 2 (2 N^2 D) for q k^T and A v, 2 E 8D for W_film. Counted on the
    whole model as the difference between depth 3 and depth 1."""
    D, E, N, hd = 32, 16, 64, 16
    block = TransformerBlock(D, E, head_dim=hd, mlp_ratio=4, dropout=0.0)
    per_block = 12 * D * D + 8 * E * D + 17 * D + 2 * hd
    assert sum(p.numel() for p in block.parameters()) == per_block
    cfg = replace(tiny_widths(preset_config("tiny")), width=D, emb_dim=E, head_dim=hd)    # 8x8 = 64 tokens
    (p1, f1), (p3, f3) = model_stats(UViT, replace(cfg, depth=1)), model_stats(UViT, replace(cfg, depth=3))
    assert (f3 - f1) / 2 == 2 * N * 12 * D * D + 2 * 2 * N * N * D + 2 * E * 8 * D
    assert (p3 - p1) / 2 == per_block
