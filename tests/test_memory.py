"""
Tests for memory.py, the memory plan of a training run.

- The plan's step (forward + backward on the meta device) against real training steps on the CPU, whose
  peak comes from the allocator's own events (profiler): small U-Net and U-ViT presets, several batch
  sizes, activation checkpointing off and on (fp32), and bf16 without checkpointing; within 15%.
  With bf16 *and* checkpointing the CPU's bf16 kernels (im2col convolution, fallback GEMMs on CPUs
  without bf16 instructions) allocate scratch inside themselves that is as large as the small
  checkpointed step itself; there the meta prediction is compared with the same step on real CPU
  tensors counted tensor by tensor, and the allocator's peak must lie above it.
- The counting tools against closed forms: saved activations of an MLP in bf16 (and the same count
  under PyTorch's own CPU autocast), one count per storage however often it is saved or viewed,
  parameters excluded, what a checkpointed block keeps, and the bytes alive during a short sequence.
- The state against closed forms (parameter count of a real model x 4 bytes, AdamW's moments and step
  counts) and against the bytes a real step leaves allocated; FSDP divides it by the world size and adds
  8 bytes per parameter of the largest unit, counted here from the architecture.
- `fits` flips at the total; the 2B U-ViT at 256 px on 8 x 80 GB does not fit as it is and fits with the
  setting recommend() picks, and not with any setting preferred before it.
"""
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import memory
import unet
import uvit

GB = 1e9
PRESETS = {"unet": unet.preset_config, "uvit": uvit.preset_config}


def mlp(a: int, b: int, c: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(a, b), nn.SiLU(), nn.Linear(b, c))


def state_bytes_of(p: dict) -> float:
    return (p["params_gb"] + p["grads_gb"] + p["optimizer_gb"] + p["ema_gb"]) * GB


def predicted_and_measured(name, preset, batch, ckpt, precision):
    """(plan, real CPU step) of a preset on one process."""
    cfg = PRESETS[name](preset, grad_checkpointing=ckpt)
    p = memory.plan(name, cfg, batch, world_size=1, fsdp=False, grad_checkpointing=ckpt, precision=precision)
    torch.manual_seed(0)
    model, batch_ = memory.build(name, cfg, "cpu"), memory.example_batch(cfg, batch, "cpu")
    return p, memory.measure_step(model, batch_, bf16=precision == "bf16")


@pytest.mark.parametrize("name,preset,batch,ckpt,precision", [
    ("unet", "tiny", 4, False, "fp32"), ("unet", "tiny", 16, False, "fp32"), ("unet", "tiny", 4, True, "fp32"),
    ("unet", "tiny", 16, True, "fp32"), ("uvit", "tiny", 4, False, "fp32"), ("uvit", "tiny", 16, False, "fp32"),
    ("uvit", "tiny", 4, True, "fp32"), ("uvit", "tiny", 16, True, "fp32"), ("unet", "small", 8, False, "fp32"),
    ("unet", "small", 8, True, "fp32"), ("uvit", "small", 8, False, "fp32"), ("uvit", "small", 8, True, "fp32"),
    ("unet", "tiny", 16, False, "bf16"), ("uvit", "tiny", 16, False, "bf16")])
def test_step_peak_matches_the_allocator(name, preset, batch, ckpt, precision):
    p, measured = predicted_and_measured(name, preset, batch, ckpt, precision)
    step = (p["activations_gb"] + p["transient_gb"]) * GB
    assert abs(step - measured["peak"]) <= 0.15 * measured["peak"]
    total = p["peak_gb"] * GB
    assert abs(total - (measured["state"] + measured["peak"])) <= 0.15 * (measured["state"] + measured["peak"])


@pytest.mark.parametrize("name", ["unet", "uvit"])
def test_bf16_checkpointed_step_matches_real_tensors(name):
    p, measured = predicted_and_measured(name, "tiny", 16, True, "bf16")
    step = (p["activations_gb"] + p["transient_gb"]) * GB
    assert abs(step - measured["tensor_peak"]) <= 0.01 * measured["tensor_peak"]
    assert measured["peak"] >= measured["tensor_peak"]


def test_saved_bytes_of_an_mlp_in_bf16():
    B, a, b, c = 16, 24, 40, 8
    model, x = mlp(a, b, c), torch.randn(B, a)
    counts = {}
    for policy in ("gpu_ops", "cpu_autocast"):
        saved = memory.SavedTensors(model.parameters())
        ops = memory.GpuOps(bf16=True)
        with saved.hooks(), (ops if policy == "gpu_ops" else torch.autocast("cpu", dtype=torch.bfloat16)):
            model(x).float().sum()
        counts[policy] = saved.bytes()
    # x needs no gradient, so layer 1 keeps only its bf16 input (for W1's gradient); SiLU keeps its input;
    # layer 2 keeps its input and the bf16 copy of W2 (for the input's gradient). 2 bytes each.
    assert counts["gpu_ops"] == 2 * (B * a + B * b + B * b + b * c)
    assert counts["cpu_autocast"] == counts["gpu_ops"]


def test_saved_tensors_counts_each_storage_once_and_no_parameters():
    n = 64
    a, w = torch.randn(2 * n, requires_grad=True), nn.Parameter(torch.randn(n))
    saved = memory.SavedTensors([w])
    with saved.hooks():
        b = a * a                     # saves a twice
        h, g = b.chunk(2)
        c = h * g                     # saves two views of b's storage
        (c * w).sum()                 # saves c, and w (a parameter)
    assert saved.bytes() == 4 * (2 * n + 2 * n + n)


def test_checkpointed_block_keeps_only_its_input():
    B, a, b = 8, 10, 30
    model, x = mlp(a, b, 5), torch.randn(B, a, requires_grad=True)
    saved = memory.SavedTensors(model.parameters())
    with saved.hooks():
        checkpoint(model, x, use_reentrant=False).sum()
    assert saved.bytes() == 4 * B * a


def test_live_bytes_follows_allocations_and_frees():
    n = 1000
    live = memory.LiveBytes()
    with live:
        x = torch.ones(n)             # 4n
        y = x + 1                     # 8n
        del x                         # 4n
        v = y.view(10, -1)            # a view: nothing new
        z = y * 2                     # 8n
        z.add_(v.flatten())           # in place: nothing new
        del y, v                      # 4n
    assert (live.peak, live.now) == (8 * n, 4 * n)
    del z
    assert live.now == 0


def test_state_against_a_real_model():
    cfg = unet.preset_config("tiny")
    model = memory.build("unet", cfg, "cpu")
    P, n = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    p = memory.plan("unet", cfg, 2, world_size=1)
    assert p["params"] == P
    assert (p["params_gb"], p["grads_gb"], p["ema_gb"]) == pytest.approx((4 * P / GB,) * 3, rel=1e-12)
    assert p["optimizer_gb"] == pytest.approx((8 * P + 4 * n) / GB, rel=1e-12)
    measured = memory.measure_step(model, memory.example_batch(cfg, 2, "cpu"), bf16=False)
    assert measured["state"] == pytest.approx(state_bytes_of(p), rel=1e-12)


def test_fsdp_divides_the_state_and_adds_the_largest_unit():
    D, E, r, hd, W = 128, 32, 4, 16, 8
    cfg = uvit.preset_config("tiny", width=D, emb_dim=E, mlp_ratio=r, head_dim=hd)
    ddp, fsdp = (memory.plan("uvit", cfg, 4, world_size=W, fsdp=f) for f in (False, True))
    n = len(list(memory.build("uvit", cfg).parameters()))
    for key in ("params_gb", "grads_gb", "ema_gb"):
        assert fsdp[key] == pytest.approx(ddp[key] / W, rel=1e-12)
    assert fsdp["optimizer_gb"] * GB == pytest.approx((ddp["optimizer_gb"] * GB - 4 * n) / W + 4 * n, rel=1e-12)
    # The largest unit is a transformer block: qkv, out projection, q/k gains, W_1, W_2 and the FiLM layer.
    attention = (D * 3 * D + 3 * D) + (D * D + D) + 2 * hd
    block = attention + (D * r * D + r * D) + (r * D * D + D) + (E * 2 * r * D + 2 * r * D)
    assert fsdp["fsdp_unit_gb"] * GB == 8 * block
    assert ddp["fsdp_unit_gb"] == 0


def test_fits_flips_at_the_total():
    cfg = uvit.preset_config("tiny")
    total = memory.plan("uvit", cfg, 4, world_size=1)["total_gb"]
    above, below = (memory.plan("uvit", cfg, 4, world_size=1, gpu_mem_gb=total * f) for f in (1.001, 0.999))
    assert above["fits"] and not below["fits"]
    assert above["total_gb"] == below["total_gb"] == total


def test_format_plan_lines_and_suggestion():
    cfg = uvit.preset_config("tiny")
    p = memory.plan("uvit", cfg, 4, world_size=2, gpu_mem_gb=1e-6)
    text = memory.format_plan(p)
    assert f"{p['total_gb']:.2f} GB" in text and "fits in 1e-06 GB: no" in text
    assert "--grad-checkpointing" in text.splitlines()[-1] and "--fsdp" in text.splitlines()[-1]
    better = dict(p, fsdp=True, grad_checkpointing=False, micro_batch=2, total_gb=0.5)
    last = memory.format_plan(p, better).splitlines()[-1]
    assert last == "  suggestion: run with --fsdp --grad-accum x2 (0.5 GB per GPU)"
    assert "suggestion" not in memory.format_plan(dict(p, fits=True))


@pytest.mark.slow
def test_2b_uvit_at_256_on_8_h100s():
    cfg = uvit.preset_config("256", num_classes=1000)
    kw = dict(world_size=8, gpu_mem_gb=80, multiscale=True)
    assert not memory.plan("uvit", cfg, 64, **kw)["fits"]
    best = memory.recommend("uvit", cfg, 64, **kw)
    assert best is not None and best["fits"] and best["micro_batch"] == 64
    order = [(False, False), (False, True), (True, False), (True, True)]       # (checkpointing, fsdp)
    for ckpt, fsdp in order[:order.index((best["grad_checkpointing"], best["fsdp"]))]:
        assert not memory.plan("uvit", cfg, 64, fsdp=fsdp, grad_checkpointing=ckpt, **kw)["fits"]
