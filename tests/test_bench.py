"""
Tests for bench.py's measuring tools (never timings: those depend on the machine and its load).

- count_flops against closed forms: a two-layer MLP whose input needs no gradient (so the first layer has
  no input-gradient product), and scaled_dot_product_attention, which must be counted even though the
  CPU flash kernel is invisible to FlopCounterMode.
- step_profile's activation memory against the bytes a small MLP must keep for its backward pass, and
  what activation checkpointing keeps instead (only the loss and the RNG state it saves to replay the
  forward); the step peak against the largest set of tensors that are alive at once in the forward pass.
- the CLI rejects a bad flag value with exit status 2.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import bench


def mlp(a: int, b: int, c: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))


def test_count_flops_mlp_closed_form():
    B, a, b, c = 8, 5, 7, 3
    model, x = mlp(a, b, c), torch.randn(B, a)
    flops = bench.count_flops(lambda: model(x).sum().backward())
    # A (B x a) @ (a x b) product is 2 B a b FLOPs. Layer 1: forward + weight gradient (x needs no
    # gradient); layer 2: forward + weight gradient + input gradient. Bias adds and ReLU are not counted.
    assert flops == 2 * (2 * B * a * b) + 3 * (2 * B * b * c)


def test_count_flops_attention_closed_form():
    B, h, N, d = 2, 3, 16, 8
    q, k, v = (torch.randn(B, h, N, d, requires_grad=True) for _ in range(3))
    flops = bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    # Forward: Q K^T and P V, each 2 N^2 d per head; backward: dV, dP, dQ, dK, four products of that size.
    assert flops == 6 * (2 * B * h * N * N * d)


def test_step_profile_activations_of_an_mlp():
    B, a, b = 64, 100, 200
    model, x, state = mlp(a, b, 1), torch.randn(B, a), {}
    mem = bench.step_profile(lambda: state.update(loss=model(x).sum()), lambda: state.pop("loss").backward())
    # Backward needs the ReLU output (for ReLU's own gradient and layer 2's weight gradient): B b floats,
    # plus the 4-byte loss. Layer 1's output is freed during the forward pass (ReLU keeps its result), and
    # x and the weights existed before the step, so they are not activations.
    assert mem["activation_bytes"] == 4 * B * b + 4
    # Both B x b tensors are alive together while ReLU runs; backward adds more (gradients) on top.
    assert mem["peak_bytes"] >= 2 * 4 * B * b
    assert 0 < mem["dense_share"] <= 1


def test_step_profile_sees_what_checkpointing_keeps():
    B, a, b = 64, 100, 200
    model, x, state = mlp(a, b, 1), torch.randn(B, a), {}
    mem = bench.step_profile(lambda: state.update(loss=checkpoint(model, x, use_reentrant=False).sum()),
                             lambda: state.pop("loss").backward())
    # The checkpointed forward keeps no activations: the loss, and the CPU RNG state saved for the replay.
    assert mem["activation_bytes"] == 4 + torch.get_rng_state().numel()


def test_cli_rejects_bad_values():
    with pytest.raises(SystemExit) as e:
        bench.parse_config(["--batch-size", "0"])
    assert e.value.code == 2
