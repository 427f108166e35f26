"""
A memory plan for a training run: what one GPU holds during a step, computed before anything is allocated.

The idea. A GPU training step holds two kinds of memory. The *state* lives between steps: the fp32
weights, their gradients, AdamW's two moments and the EMA copy; its size follows from the parameter
count alone. The *step* comes and goes: the activations autograd keeps from the forward pass for the
backward pass, plus what is in flight at the busiest moment (gradients of activations, blocks recomputed
under activation checkpointing, autocast's bf16 copies of the weights). The step is measured by running
it on the meta device, where tensors have shapes and dtypes but no memory: `saved_tensors_hooks` add up
every storage autograd saves (once however often it is saved or viewed; parameters are state, not
activations), and a dispatch mode follows every storage from the op that makes it to the moment it is
freed, through the forward and the backward pass, which gives the peak. Nothing is guessed per layer, so
the plan follows the networks as they change.

Per GPU (P parameters in n tensors, W ranks, B images per micro-batch; bytes):
    DDP      params 4P   grads 4P   AdamW 8P + 4n (two fp32 moments, a step count per tensor)   EMA 4P
    FSDP     the same divided by W (the step counts are not), plus U = 8 P_u: the largest unit's gathered
             weights twice (the unit running and the next one, prefetched; 2 x 2 bytes in bf16) and its
             gradients cast to fp32 for the reduce-scatter (4 bytes); in fp32, 2 x 4 bytes
    step     A + T: A what autograd keeps at the end of the forward pass, T the extra at the step's peak
    peak     state + A + T (+ U)                     what torch.cuda.max_memory_allocated would report
    total    peak + 2 GB + 5% of peak                fits = total <= gpu_mem
FSDP as train.py shards: fully_shard on each conv level, U-Net middle block and transformer block (the
units, fsdp_units), the root holds the rest; a unit's bf16 weights are gathered before it runs and freed
after, gradients are computed in bf16, reduced in fp32 and freed; so no autocast weight copies.
Activation checkpointing (torch.utils.checkpoint, non-reentrant): a checkpointed block's saves go to
checkpoint's own hooks, which sit inside ours, so ours see only what checkpoint keeps, the block's
inputs; the block's activations return in the backward pass, recomputed one block at a time, and the
dispatch mode counts them there (part of T), as it counts the weight copies autocast caches until the
forward pass ends.

Symbols: P -> params, W -> world_size, B -> micro_batch, A -> activations_gb, T -> transient_gb,
         U -> fsdp_unit_gb, P_u -> the parameters of the largest FSDP unit (largest_unit).

The GPU's op policy, emulated (GpuOps). The meta device has no autocast, and the CPU's autocast differs
from CUDA's, so the ops that decide what is saved run as a CUDA step would run them: conv2d and linear
in bf16, their fp32 weights cast once and the copy kept until the forward pass ends (autocast's cache);
group_norm, layer_norm and the norm inside F.normalize in fp32 (PyTorch's CUDA autocast lists); attention
through a fused kernel that keeps q, k, v, the output and a logsumexp, never the N x N matrix (flash and
memory-efficient attention on the GPU); dropout through the fused kernel that keeps a 1-byte mask. Every
other op runs in the dtype its inputs give it, as under autocast. So bf16 does not halve the activations:
a norm's input is saved as an fp32 copy, the SiLU after it saves fp32, and the U-ViT's residual stream
is fp32 (its fp32 position embedding is added to it); per image the 256 px presets keep 0.84x (U-Net)
and 0.67x (U-ViT) of their fp32 activations.

What "peak" means, the same on both sides of the validation (tests/test_memory.py): the most bytes
allocated at once during a step (forward, loss, backward) on top of the state, with gradients kept
between steps (DDP's buckets). The check runs real training steps on the CPU under the same op policy
(`measure_step`) and reads the allocator's own events through the profiler (`cpu_allocations`, which
bench.py can share): U-Net and U-ViT presets, several batch sizes, checkpointing off and on, within 15%
(in practice 0-12% below: the CPU's kernels allocate scratch inside themselves, which the meta device
has none of; on the GPU that is cuDNN/cuBLAS workspace, inside the allowance).

Choices and why:
- The allowance: 2 GB for what lives outside PyTorch's tensors but inside the card (CUDA context and
  kernels ~0.5 GB, cuBLAS/cuDNN workspaces, NCCL's communication buffers), and 5% of the peak for the
  caching allocator's fragmentation (reserved minus allocated in steady training). GB are 1e9 bytes; an
  "80 GB" card holds 80 GiB = 85.9 GB, so --gpu-mem 80 keeps that difference as a further margin.
- Gradients are counted as kept between steps (DDP keeps them in its buckets); a single process frees
  them, so its plan is a slight over-estimate. The batch tensors (a few images) are not counted.
- Eager mode: torch.compile recomputes cheap elementwise ops instead of saving them and usually needs
  less, so the plan is an upper bound for compiled runs.

Run:  python memory.py                                 the paper-scale table (DDP/FSDP x checkpointing)
      python train.py --res 256 --model uvit --plan    one run's plan, with a suggestion if it does not fit
Test: pytest tests/test_memory.py
"""
import argparse
import copy
import dataclasses
import json
import weakref
from itertools import accumulate

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge, saved_tensors_hooks
from torch.overrides import TorchFunctionMode
from torch.profiler import DeviceType, ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import losses
from checkpoint import MODELS
from schedules import get_schedule

GB = 1e9
WORKSPACE_GB = 2.0        # CUDA context, library workspaces, NCCL buffers (docstring)
FRAGMENTATION = 0.05      # of the allocator peak
LOW_PRECISION_OPS = (F.conv2d, F.linear)
FLOAT32_OPS = (F.group_norm, F.layer_norm)
PAPER_RES = (64, 128, 256, 512)


# ----------------------------------------------------------------------------------------------------
# The GPU's op policy, on any device (meta for the plan, CPU for the measurement that checks it).

class GpuOps(TorchFunctionMode):
    """Run the model's functions as a CUDA training step would (module docstring): bf16 autocast's casts
    if `bf16`, fused attention and dropout always. Leave the forward pass with `end_forward()`, which
    drops the cached weight copies as leaving autocast does; keep the mode on for the backward pass,
    where checkpointed blocks run their forward again under it, as checkpoint re-enters autocast."""

    def __init__(self, bf16: bool):
        super().__init__()
        self.bf16, self.copies, self.caching = bf16, {}, True

    def end_forward(self) -> None:
        self.copies, self.caching = {}, False

    def cast(self, x, dtype):
        """x in `dtype` if it is a floating tensor; a weight (a leaf that needs grad) is cast once."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        if not (self.caching and x.is_leaf and x.requires_grad):
            return x.to(dtype)
        if x not in self.copies:
            self.copies[x] = x.to(dtype)
        return self.copies[x]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.attention(*args, **kwargs)
        if func is F.dropout:
            return self.dropout(*args, **kwargs)
        if func is F.normalize and self.bf16:
            return self.normalize(*args, **kwargs)
        dtype = torch.bfloat16 if func in LOW_PRECISION_OPS else torch.float32 if func in FLOAT32_OPS else None
        if self.bf16 and dtype is not None:
            args = [self.cast(a, dtype) for a in args]
            kwargs = {k: self.cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        """A fused kernel: saves q, k, v, the output and a (B, heads, N) logsumexp."""
        if self.bf16:
            q, k, v = (self.cast(t, torch.bfloat16) for t in (q, k, v))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    def dropout(self, x, p=0.5, training=True, inplace=False):
        return torch.native_dropout(x, p, True)[0] if training and p > 0 else x   # keeps a bool mask

    def normalize(self, x, p=2.0, dim=1, eps=1e-12, out=None):
        """x / |x| with the norm in fp32 (autocast's policy for norms), so the quotient is fp32 too."""
        return x / torch.linalg.vector_norm(x, p, dim, keepdim=True, dtype=torch.float32).clamp_min(eps)


def backward(loss: torch.Tensor) -> None:
    """loss.backward() without leaving an active GpuOps: called through the loss's gradient edge, it is
    not intercepted by the mode, so the mode stays on for checkpointed blocks' recomputation."""
    torch.autograd.backward(get_gradient_edge(loss), grad_tensors=torch.ones_like(loss))


# ----------------------------------------------------------------------------------------------------
# Counting bytes: what autograd saves, and what is alive.

def storage_of(t: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory behind t: views of one tensor share it."""
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


class SavedTensors:
    """saved_tensors_hooks that add up the storages autograd keeps for backward, each once; parameters'
    storages are state, not activations. A tensor saved inside a checkpointed block goes to checkpoint's
    own (inner) hooks and is not seen; what checkpoint keeps, its inputs, is saved where these hooks see
    it."""

    def __init__(self, params):
        self.params = {storage_of(p)[0] for p in params}
        self.storages = {}                                   # identity -> bytes

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes = storage_of(t)
        if key not in self.params:
            self.storages.setdefault(key, nbytes)
        return t

    def hooks(self):
        return saved_tensors_hooks(self.pack, lambda t: t)

    def bytes(self, only=None) -> int:
        return sum(b for k, b in self.storages.items() if only is None or k in only)


class LiveBytes(TorchDispatchMode):
    """Follows every storage an op makes (an output that is not a view or in-place result of an input)
    until it is freed (a finalizer on the storage), and records the most bytes alive at once. Tensors
    that existed before (weights, state, the batch) are not counted."""

    def __init__(self):
        super().__init__()
        self.alive, self.now, self.peak = set(), 0, 0

    def _freed(self, key: int, nbytes: int) -> None:
        self.alive.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, outs):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                key, nbytes = storage_of(t)
                if key not in self.alive:
                    self.alive.add(key)
                    self.now += nbytes
                    weakref.finalize(t.untyped_storage(), self._freed, key, nbytes)
        self.peak = max(self.peak, self.now)
        return out


# ----------------------------------------------------------------------------------------------------
# One training step on the meta device.

def build(model_name: str, model_config, device="meta") -> nn.Module:
    with torch.device(device):
        return MODELS[model_name][0](model_config)


def example_batch(cfg, batch: int, device="meta") -> dict:
    """x, labels, t, eps of one micro-batch, as train.py's draw_batch makes them (torch's global RNG;
    on the meta device only their shapes exist)."""
    shape = (batch, cfg.in_channels, cfg.res, cfg.res)                         # (B, C, res, res)
    labels = torch.randint(0, cfg.num_classes + 1, (batch,), device=device) if cfg.num_classes else None
    return dict(x=torch.rand(shape, device=device) * 2 - 1, labels=labels, t=torch.rand(batch, device=device),
                eps=torch.randn(shape, device=device))


def forward_backward(model, batch: dict, ops: GpuOps, live: LiveBytes, saved: SavedTensors,
                     multiscale=False, weighting="eps") -> set:
    """Loss of one micro-batch as train.py's forward_backward computes it (saved's hooks on), then its
    backward, under `ops` and counted by `live`. Returns the storages of the weights' bf16 copies."""
    schedule = get_schedule("shifted", model.config.res)
    with live, ops:
        with saved.hooks():
            loss = losses.diffusion_loss(model, batch["x"], schedule, batch["labels"], multiscale=multiscale,
                                         weighting=weighting, t=batch["t"], eps=batch["eps"]).mean()
        copies = {storage_of(c)[0] for c in ops.copies.values()}
        ops.end_forward()
        backward(loss)
        del loss
    return copies


def step_bytes(model, batch: dict, ops: GpuOps, multiscale=False, weighting="eps") -> dict:
    """One micro-batch's step (on meta tensors: no memory used). activations: what autograd keeps at
    the end of the forward pass; weight_copies: the part of it that is bf16 copies of weights; peak: the
    most bytes alive at once during forward and backward."""
    saved, live = SavedTensors(model.parameters()), LiveBytes()
    copies = forward_backward(model, batch, ops, live, saved, multiscale, weighting)
    return dict(activations=saved.bytes(), weight_copies=saved.bytes(only=copies), peak=live.peak)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules train.py's FSDP shards one by one: conv levels, U-Net middle blocks, transformer blocks."""
    return [*model.levels, *getattr(model, "middle", ()), *getattr(model, "blocks", ())]


def largest_unit(model: nn.Module) -> int:
    """Parameters of the largest FSDP unit, the root (what no unit holds) included."""
    count = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731
    units = [count(u) for u in fsdp_units(model)]
    return max(units + [count(model) - sum(units)])


def meta_step(model_name: str, model_config, micro_batch: int, fsdp: bool, bf16: bool,
              multiscale: bool, weighting: str) -> tuple[nn.Module, dict]:
    """The model on the meta device and its step's bytes. DDP: fp32 weights, gradients kept in place
    (buckets). FSDP: the gathered weights in bf16 if `bf16`, each gradient freed once computed (it is
    reduce-scattered into the shard)."""
    model = build(model_name, model_config)
    if fsdp:
        model.to(torch.bfloat16 if bf16 else torch.float32)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    else:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    batch = example_batch(model_config, micro_batch)
    return model, step_bytes(model, batch, GpuOps(bf16), multiscale, weighting)


# ----------------------------------------------------------------------------------------------------
# The plan.

def state_bytes(params: int, tensors: int, shards: int) -> dict:
    """Bytes per GPU of the state: fp32 weights, gradients, AdamW moments (+ a 4-byte step count per
    tensor, not sharded) and EMA, each divided over `shards` ranks (1 under DDP)."""
    return dict(params=4 * params / shards, grads=4 * params / shards,
                optimizer=8 * params / shards + 4 * tensors, ema=4 * params / shards)


def plan(model_name: str, model_config, micro_batch: int, world_size: int = 8, gpu_mem_gb: float = 80,
         fsdp: bool = False, grad_checkpointing: bool = False, precision: str = "bf16",
         multiscale: bool = False, weighting: str = "eps") -> dict:
    """Per-GPU memory of a training run, in GB (1e9 bytes), without allocating the model (module
    docstring for the model). `model_config` is the network's config dataclass (train.model_config);
    `micro_batch` the images per GPU per forward pass (global batch / (world_size x grad_accum))."""
    if model_name not in MODELS or precision not in ("bf16", "fp32") or micro_batch < 1 or world_size < 1:
        raise ValueError(f"plan: model_name one of {', '.join(MODELS)} (got {model_name!r}), precision 'bf16' or "
                         f"'fp32' (got {precision!r}), micro_batch and world_size positive (got {micro_batch}, "
                         f"{world_size}); a per-GPU batch below 1 image needs fewer GPUs or a larger --batch-size")
    cfg = dataclasses.replace(model_config, grad_checkpointing=grad_checkpointing)
    bf16 = precision == "bf16"
    model, step = meta_step(model_name, cfg, micro_batch, fsdp, bf16, multiscale, weighting)
    params = sum(p.numel() for p in model.parameters())
    state = state_bytes(params, len(list(model.parameters())), world_size if fsdp else 1)
    unit = largest_unit(model) * (2 * (2 if bf16 else 4) + (4 if bf16 else 0)) if fsdp else 0   # = 8 P_u
    peak = sum(state.values()) + step["peak"] + unit
    allowance = WORKSPACE_GB * GB + FRAGMENTATION * peak
    out = dict(model=model_name, params=params, micro_batch=micro_batch, world_size=world_size,
               gpu_mem_gb=gpu_mem_gb, fsdp=fsdp, grad_checkpointing=grad_checkpointing, precision=precision,
               **{f"{k}_gb": v / GB for k, v in state.items()},
               activations_gb=step["activations"] / GB, transient_gb=(step["peak"] - step["activations"]) / GB,
               fsdp_unit_gb=unit / GB, peak_gb=peak / GB, allowance_gb=allowance / GB,
               total_gb=(peak + allowance) / GB, weight_copies_gb=step["weight_copies"] / GB,
               activations_per_image_gb=(step["activations"] - step["weight_copies"]) / micro_batch / GB)
    out["fits"] = out["total_gb"] <= gpu_mem_gb
    return out


def recommend(model_name: str, model_config, micro_batch: int, world_size: int = 8, gpu_mem_gb: float = 80,
              **kw) -> dict | None:
    """The cheapest setting that fits: no checkpointing before checkpointing (it recomputes the forward
    pass, about a third more compute), DDP before FSDP within each (FSDP adds communication, no
    compute); if none fits, the same at half the micro-batch (twice the --grad-accum), down to 1 image.
    Returns that plan, or None."""
    while micro_batch >= 1:
        for ckpt in (False, True):
            for fsdp in (False, True) if world_size > 1 else (False,):
                p = plan(model_name, model_config, micro_batch, world_size, gpu_mem_gb, fsdp, ckpt, **kw)
                if p["fits"]:
                    return p
        micro_batch //= 2
    return None


def setting(p: dict) -> str:
    """The train.py flags of a plan's setting, e.g. '--fsdp --grad-checkpointing' ('' = the default)."""
    return " ".join(f for f, on in (("--fsdp", p["fsdp"]), ("--grad-checkpointing", p["grad_checkpointing"])) if on)


def format_plan(p: dict, better: dict | None = None) -> str:
    """A plan as a table, one line per item in GB per GPU; if it does not fit, a one-line suggestion:
    `better` (a recommend() result) if given, as flags ('--grad-accum xk': k times the current value),
    else what could be turned on."""
    mode = f"FSDP over {p['world_size']}" if p["fsdp"] else f"DDP x {p['world_size']}"
    ckpt = "with" if p["grad_checkpointing"] else "no"
    rows = [("weights (fp32)", "params_gb"), ("gradients (fp32)", "grads_gb"), ("AdamW moments", "optimizer_gb"),
            ("EMA", "ema_gb"), (f"activations ({p['activations_per_image_gb']:.3f} GB/image)", "activations_gb"),
            ("backward extra at its peak", "transient_gb"), ("FSDP gathered units", "fsdp_unit_gb"),
            ("= allocator peak", "peak_gb"), ("+ workspace, fragmentation", "allowance_gb"), ("= total", "total_gb")]
    lines = [f"{p['model']}: {p['params'] / 1e9:.2f}B parameters, {p['micro_batch']} images per GPU per micro-batch, "
             f"{p['precision']}, {mode}, {ckpt} activation checkpointing"]
    lines += [f"  {name:<36}{p[key]:>9.2f} GB" for name, key in rows if key != "fsdp_unit_gb" or p["fsdp"]]
    lines.append(f"  fits in {p['gpu_mem_gb']:g} GB: {'yes' if p['fits'] else 'no'}")
    if p["fits"]:
        return "\n".join(lines)
    if better is not None:
        accum = p["micro_batch"] // better["micro_batch"]
        flags = " ".join(filter(None, [setting(better), f"--grad-accum x{accum}" if accum > 1 else ""]))
        lines.append(f"  suggestion: run with {flags} ({better['total_gb']:.1f} GB per GPU)")
    else:
        todo = [f for f, on in (("--grad-checkpointing", p["grad_checkpointing"]),
                                ("--fsdp", p["fsdp"] or p["world_size"] == 1)) if not on]
        lines.append(f"  suggestion: {', '.join(todo + ['a smaller per-GPU batch with --grad-accum'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Measuring a real step (CPU): the check of the plan, and bench.py's memory numbers.

def cpu_allocations(prof) -> list[int]:
    """Bytes allocated (+) and freed (-) on the CPU, in order, from a finished torch.profiler run with
    profile_memory=True: the allocator's own events, so they include what kernels allocate inside."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    return [b for _, b in events]


def measure_step(model: nn.Module, batch: dict, bf16: bool, multiscale=False, weighting="eps") -> dict:
    """One real training step on the CPU under GpuOps, as train.py takes it (forward, loss, backward,
    gradient clipping, AdamW, EMA; gradients kept, as in DDP's buckets), after one step that creates the
    optimizer state. state: bytes of the weights, gradients, AdamW state and EMA; peak: the most bytes
    allocated at once during the step on top of them (the profiler's allocator events); tensor_peak: the
    same counted by LiveBytes, i.e. without what kernels allocate inside themselves."""
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(live: LiveBytes):
        forward_backward(model, batch, GpuOps(bf16), live, SavedTensors(()), multiscale, weighting)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-3)
        optimizer.zero_grad(set_to_none=False)

    step(LiveBytes())
    state = [*model.parameters(), *ema.parameters(), *(p.grad for p in model.parameters()),
             *(v for s in optimizer.state.values() for v in s.values())]
    live = LiveBytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(live)
    return dict(state=sum(dict(map(storage_of, state)).values()),
                peak=max(accumulate(cpu_allocations(prof)), default=0), tensor_peak=live.peak)


# ----------------------------------------------------------------------------------------------------
# The paper-scale table: python memory.py

def paper_rows(world_size: int = 8, batch_size: int = 512, mems=(80, 40)) -> list[dict]:
    """For each paper-scale row of train.py's TRAIN_PRESETS (bf16, its loss): the plans under {DDP, FSDP}
    x {checkpointing off, on}, in the order of preference, and the first that fits each memory size."""
    import train                                               # train.py imports this module
    rows = []
    for model_name, res in train.TRAIN_PRESETS:
        if res not in PAPER_RES:
            continue
        cfg = train.resolve_config(["--model", model_name, "--res", str(res), "--batch-size", str(batch_size)])
        mcfg, micro = train.model_config(cfg, num_classes=1000), batch_size // world_size
        plans = [plan(model_name, mcfg, micro, world_size, max(mems), fsdp, ckpt, multiscale=cfg.multiscale,
                      weighting=cfg.weighting) for ckpt in (False, True) for fsdp in (False, True)]
        first = {mem: next((setting(p) or "DDP" for p in plans if p["total_gb"] <= mem), None) for mem in mems}
        rows.append(dict(model=model_name, res=res, plans=plans, first_fit=first))
    return rows


def format_rows(rows: list[dict], mems=(80, 40)) -> str:
    """The rows as a markdown table: total GB per GPU of each setting, whether it fits each memory size,
    and the cheapest setting that does."""
    mark = lambda gb: ", ".join(f"{m} {'✓' if gb <= m else '✗'}" for m in mems)   # noqa: E731
    lines = ["| model | res | params | activations GB/image | DDP | FSDP | DDP + ckpt | FSDP + ckpt | "
             + " | ".join(f"cheapest on {m} GB" for m in mems) + " |", "|" + " --- |" * (8 + len(mems))]
    for r in rows:
        p0 = r["plans"][0]
        cells = [f"{p['total_gb']:.1f} ({mark(p['total_gb'])})" for p in r["plans"]]
        best = [r["first_fit"][m] or "none at this batch: --grad-accum" for m in mems]
        head = [r["model"], str(r["res"]), f"{p0['params'] / 1e9:.2f}B", f"{p0['activations_per_image_gb']:.2f}"]
        lines.append("| " + " | ".join(head + cells + best) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Per-GPU memory (GB) of the paper-scale TRAIN_PRESETS rows, bf16; "
                                 "one run's plan: python train.py --plan")
    ap.add_argument("--gpus", type=int, default=8, help="data-parallel ranks")
    ap.add_argument("--batch-size", type=int, default=512, help="global batch (per GPU: divided by --gpus)")
    args = ap.parse_args()
    print(format_rows(paper_rows(args.gpus, args.batch_size)))


def print_plan(model_name: str, model_config, cfg) -> None:
    """train.py --plan: the plan of a training config (its batch over --gpus GPUs x --grad-accum, --fsdp,
    --grad-checkpointing, bf16 unless --precision fp32) as a table, or one JSON object with --json; when it
    does not fit, the cheapest setting that does."""
    micro = cfg.batch_size // (cfg.gpus * cfg.grad_accum)
    kw = dict(world_size=cfg.gpus, gpu_mem_gb=cfg.gpu_mem, precision="fp32" if cfg.precision == "fp32" else "bf16",
              multiscale=cfg.multiscale, weighting=cfg.weighting)
    p = plan(model_name, model_config, micro, fsdp=cfg.fsdp, grad_checkpointing=cfg.grad_checkpointing, **kw)
    if cfg.json:
        return print(json.dumps(p))
    print(format_plan(p, None if p["fits"] else recommend(model_name, model_config, micro, **kw)))
