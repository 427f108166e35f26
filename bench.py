"""
bench.py: how fast training and sampling run, measured against this machine's own arithmetic peak.

The idea. Wall-clock numbers do not transfer between machines, but *utilisation* does: the fraction of
the hardware's fp32 peak that a training step turns into useful FLOPs. So the benchmark first measures
the peak itself, then, for each model preset, counts the FLOPs of one forward+backward pass per image
(torch.utils.flop_counter: matmuls, convolutions and attention, 2 FLOPs per multiply-add) and times real
training steps. Achieved FLOP/s / peak FLOP/s is the number to compare with a GPU run (where the same
code runs bf16, flash attention through SDPA, fused AdamW, torch.compile).

Two peaks, because on some CPUs the libraries disagree by 2x or more: `torch.mm` (MKL's sgemm, what
nn.Linear and attention get) and the same kind of product through oneDNN (a 1x1 convolution, M x K x N =
4096 x 1024 x 1024, what the conv layers get). MKL picks its code path by CPU vendor: on the AMD CPU of
our README its sgemm runs at AVX2 speed, about 40% of what oneDNN's AVX-512 kernels reach on the same
core. The machine's peak is the larger of the two; "% of mm" is against torch.mm alone.

What it measures (medians of timed repetitions after warm-up; the machine may be shared and noisy, so
compare ratios taken within one run; the cores other processes used meanwhile are printed per preset
and for the whole run, so a shared row shows itself):
    peak       fp32 FLOP/s of torch.mm (n x n, 2 n^3 FLOPs) and of oneDNN, best of N each; measured
               at the start and again right before each preset's timed steps (rows use their own)
    train      per preset: parameters, fwd+bwd GFLOPs per image, img/s of a full step (loss, backward,
               AdamW), achieved GFLOP/s and fraction of peak, the share of step time spent in conv,
               matmul and attention kernels, activation memory (what the forward pass leaves allocated
               for backward) and the peak extra memory of the step (activations + gradients + scratch)
    compile    eager vs torch.compile for the default preset, and a first run's compile time (empty
               inductor cache; not with --quick)
    ckpt       activation memory with and without activation checkpointing, U-ViT at 128x128
    save       how long a checkpoint write holds training up: the blocking part of checkpoint.BackgroundWriter
               (the CPU snapshot) against a synchronous save of the same state (weights, EMA, 2 AdamW moments)
    sample     ms per sampler step, images/s, and the sampler's overhead over bare model forwards
    fid        Inception feature extraction images/s (random weights: speed does not depend on them)
               and the time of the FID trace term at d = 2048
FLOPs are counted with SDPA's math backend: FlopCounterMode has no formula for the CPU flash-attention
kernel (it would count attention as zero); the math backend does the same products through bmm, which it
counts. Only the count runs this way; timed steps use the fast kernel. Memory comes from the profiler's
allocator events (CPU tensors), so it also sees what activation checkpointing keeps.

Run:  python bench.py            (a few minutes on 2 cores)
      python bench.py --quick    (under a minute: two presets, fewer repetitions, no compile/ckpt)
      python bench.py --json bench.json
On a machine shared with other jobs, OpenMP threads that spin-wait for a descheduled sibling can make
small kernels many times slower: run with OMP_WAIT_POLICY=PASSIVE, or --threads 1. The last line states
the default preset's fraction of peak.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import accumulate

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import DeviceType, ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import fid
import inception
from losses import diffusion_loss
from checkpoint import BackgroundWriter, build_model, save_checkpoint
from data import add_config_flags, config_from_args, flag
from sample import sample
from schedules import get_schedule

# (model, preset, res, batch). First the default demo network (python train.py: unet "small" at 32x32;
# its batch is --batch-size), then CPU-sized networks at 32, 64 and 128. uvit "cpu64" is the
# transformer-heavy one: 256 tokens of width 256 hold about 90% of its FLOPs.
TRAIN_CASES = [("unet", "small", 32, 64), ("unet", "tiny", 32, 64), ("uvit", "small", 32, 64),
               ("uvit", "tiny", 32, 64), ("unet", "small", 64, 32), ("uvit", "small", 64, 32),
               ("uvit", "cpu64", 64, 16), ("unet", "small", 128, 8), ("uvit", "small", 128, 8)]
QUICK_CASES = [TRAIN_CASES[0], ("uvit", "cpu64", 64, 16)]
CKPT_CASE = ("uvit", "cpu64", 128, 4)              # activation checkpointing, with and without
DENSE_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::mm", "aten::addmm", "aten::bmm",
             "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


@dataclass
class BenchConfig:
    quick: bool = flag(False, "under a minute: two presets, fewer repetitions, no compile or checkpointing")
    json: str = flag("", "also write the results to this JSON file")
    batch_size: int = flag(64, "batch of the default preset, the first row")
    threads: int = flag(0, "torch threads (0: torch's default, all cores)")
    seconds: float = flag(4.0, "time at least this long per timed measurement")


def parse_config(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_config_flags(p, BenchConfig)
    cfg = config_from_args(BenchConfig, vars(p.parse_args(argv)))
    if cfg.batch_size < 1 or cfg.threads < 0 or cfg.seconds <= 0:
        p.error("--batch-size must be >= 1, --threads >= 0 and --seconds > 0")
    return cfg


# ----------------------------------------------------------------------------------------------------
# Measuring tools: time, FLOPs, memory.

def once(fn) -> float:
    """Seconds of one fn() call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat_timed(fn, min_reps: int, seconds: float, warmup: int = 1) -> list[float]:
    """Seconds of each fn() call after warm-up; at least min_reps calls and at least `seconds` in all."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < min_reps or sum(times) < seconds:
        times.append(once(fn))
    return times


def count_flops(fn) -> int:
    """FLOPs of fn(): matmuls, convolutions and attention (a multiply-add is 2). Attention runs on SDPA's
    math backend here, because FlopCounterMode has no formula for the CPU flash kernel (it counts 0)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (some torch builds log every profiler start/stop there, in C++)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profiled(fn) -> tuple[list[int], dict]:
    """Run fn() under the profiler: (bytes allocated (+) and freed (-) on the CPU, in order; self time in
    microseconds per op name). Profiling and memory are the point here, not stderr (silenced)."""
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    return [b for _, b in events], {a.key: a.self_cpu_time_total for a in prof.key_averages()}


def step_profile(forward, rest) -> dict:
    """Profile forward() then rest() (backward, optimizer): the bytes the forward pass leaves allocated
    (the activations autograd keeps, plus the loss), the peak bytes allocated above the start over both,
    and the share of self time spent in dense kernels (conv, matmul, attention)."""
    fwd_bytes, fwd_times = profiled(forward)
    rest_bytes, rest_times = profiled(rest)
    times = {k: fwd_times.get(k, 0) + rest_times.get(k, 0) for k in fwd_times.keys() | rest_times.keys()}
    return dict(activation_bytes=sum(fwd_bytes), peak_bytes=max(accumulate(fwd_bytes + rest_bytes), default=0),
                dense_share=sum(times.get(k, 0) for k in DENSE_OPS) / max(sum(times.values()), 1e-9))


# ----------------------------------------------------------------------------------------------------
# The benchmarks.

def measure_peak(reps: int, n: int = 2048) -> dict:
    """fp32 FLOP/s, best of reps: torch.mm (n x n x n, MKL) and a 1x1 conv in channels_last (oneDNN): the
    product (4096 x 1024) @ (1024 x 1024), a shape where oneDNN runs its fastest kernel."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    x = torch.randn(16, 1024, 16, 16).contiguous(memory_format=torch.channels_last)   # M = 16 * 16 * 16
    w = torch.randn(1024, 1024, 1, 1)
    mm = 2 * n**3 / min(repeat_timed(lambda: torch.mm(a, b), reps, 0.0))
    onednn = 2 * 4096 * 1024 * 1024 / min(repeat_timed(lambda: F.conv2d(x, w), reps, 0.0))
    return dict(mm_gflops=mm / 1e9, onednn_gflops=onednn / 1e9, peak_gflops=max(mm, onednn) / 1e9)


def make_model(name: str, preset: str, res: int, **overrides):
    cfg = __import__(name).preset_config(preset, res=res, **overrides)
    return build_model(name, asdict(cfg)), cfg


def training_step(model, opt, x, schedule):
    """forward(), rest(): the two halves of one optimisation step as train.py takes it (minus EMA and
    gradient clipping, a few elementwise passes over the parameters)."""
    state = {}

    def forward():
        state["loss"] = diffusion_loss(model, x, schedule).mean()

    def rest():
        state.pop("loss").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return forward, rest


def bench_train(name, preset, res, batch, min_reps: int, seconds: float) -> dict:
    """One preset: its FLOPs, the median img/s of full training steps, and one profiled step. The peak
    is measured again right before the timed steps and each row is divided by its own: the load of a
    shared machine changes during a run."""
    torch.manual_seed(0)
    model, cfg = make_model(name, preset, res)
    x = torch.rand(batch, cfg.in_channels, res, res) * 2 - 1
    schedule = get_schedule("shifted", res)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward, rest = training_step(model, opt, x, schedule)
    flops = count_flops(lambda: diffusion_loss(model, x, schedule).mean().backward()) / batch
    model.zero_grad(set_to_none=True)
    forward(), rest(), forward(), rest()                               # warm-up (and AdamW's state)
    peak = measure_peak(3)
    times = repeat_timed(lambda: (forward(), rest()), min_reps, seconds, warmup=0)
    mem = step_profile(forward, rest)
    img_s = batch / statistics.median(times)
    return dict(model=name, preset=preset, res=res, batch=batch, params=sum(p.numel() for p in model.parameters()),
                gflops_per_img=flops / 1e9, img_per_s=img_s, gflops_per_s=flops * img_s / 1e9,
                frac_peak=flops * img_s / 1e9 / peak["peak_gflops"], frac_mm=flops * img_s / 1e9 / peak["mm_gflops"],
                dense_share=mem["dense_share"], activation_mb=mem["activation_bytes"] / 2**20,
                step_peak_mb=mem["peak_bytes"] / 2**20, reps=len(times), peak=peak)


@contextlib.contextmanager
def empty_inductor_cache():
    """Compile into an empty cache directory, as a first run does (later runs reuse compiled kernels)."""
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            if saved is not None:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def bench_compile(name, preset, res, batch, min_reps, seconds) -> dict:
    """Eager vs torch.compile (in place, as train.py does). Compile time: the first compiled step minus a
    compiled step, with an empty inductor cache (what a first run pays; later runs reuse the cache).
    Eager and compiled steps alternate, and the speed-up is the median ratio of neighbours, so a load
    change on a shared machine hits both sides alike."""
    steps, first = {}, {}
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        model, cfg = make_model(name, preset, res)
        if mode == "compile":
            model.compile()
        x = torch.rand(batch, cfg.in_channels, res, res) * 2 - 1
        forward, rest = training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), x,
                                      get_schedule("shifted", res))
        steps[mode] = lambda forward=forward, rest=rest: (forward(), rest())
        first[mode] = once(steps[mode])
        steps[mode]()                                                     # warm-up
    pairs = []
    while len(pairs) < min_reps or sum(e + c for e, c in pairs) < seconds:
        pairs.append((once(steps["eager"]), once(steps["compile"])))
    eager, compiled = (statistics.median(t) for t in zip(*pairs))
    return dict(eager_img_per_s=batch / eager, compiled_img_per_s=batch / compiled,
                speedup=statistics.median(e / c for e, c in pairs), compile_time_s=first["compile"] - compiled)


def bench_checkpointing(name, preset, res, batch, min_reps: int) -> dict:
    """Activation memory, step peak and step time with and without activation checkpointing."""
    out = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, cfg = make_model(name, preset, res, grad_checkpointing=ckpt)
        x = torch.rand(batch, cfg.in_channels, res, res) * 2 - 1
        forward, rest = training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), x,
                                      get_schedule("shifted", res))
        sec = statistics.median(repeat_timed(lambda: (forward(), rest()), min_reps, 0.0))
        mem = step_profile(forward, rest)
        out["checkpointed" if ckpt else "plain"] = dict(activation_mb=mem["activation_bytes"] / 2**20,
                                                        step_peak_mb=mem["peak_bytes"] / 2**20, step_s=sec)
    out["activation_reduction"] = out["plain"]["activation_mb"] / out["checkpointed"]["activation_mb"]
    out["peak_reduction"] = out["plain"]["step_peak_mb"] / out["checkpointed"]["step_peak_mb"]
    out["time_ratio"] = out["checkpointed"]["step_s"] / out["plain"]["step_s"]
    return out


def bench_save(params: int = 50_000_000) -> dict:
    """Seconds a checkpoint of `params` fp32 parameters (x4: weights, EMA, two AdamW moments) costs the
    training loop: synchronous save_checkpoint vs BackgroundWriter.submit (what blocks: the snapshot), and
    the background write that follows. Written to a temporary folder on this machine's disk."""
    torch.manual_seed(0)
    tensors = {f"w{i}": torch.randn(params // 10) for i in range(10)}
    state = {"step": 1, "model": tensors, "ema": {k: v.clone() for k, v in tensors.items()},
             "optimizer": {"exp_avg": {k: v.clone() for k, v in tensors.items()},
                           "exp_avg_sq": {k: v.clone() for k, v in tensors.items()}}}
    with tempfile.TemporaryDirectory() as d:
        sync = once(lambda: save_checkpoint(d, state, keep=1))
        writer = BackgroundWriter()
        first = once(lambda: writer.submit(d, {**state, "step": 2}, keep=1))      # allocates its buffers
        writer.wait()
        blocking = once(lambda: writer.submit(d, {**state, "step": 3}, keep=1))   # every later save
        background = once(writer.wait)
    return dict(gb=16 * params / 1e9, sync_s=sync, first_blocking_s=first, blocking_s=blocking,
                background_s=background, blocking_fraction=blocking / sync)


def bench_sample(name, preset, res, batch, steps, min_reps, seconds) -> dict:
    """The sampler (ancestral steps, per-image noise generators) vs `steps` bare forward passes of the
    model on the same batch. The two alternate, and the overhead is the median ratio of neighbours, so
    a load change on a shared machine hits both sides alike."""
    torch.manual_seed(0)
    model, cfg = make_model(name, preset, res)
    model.eval()
    schedule = get_schedule("shifted", res)
    shape = (batch, cfg.in_channels, res, res)
    z, logsnr = torch.randn(shape), torch.zeros(batch)

    @torch.no_grad()
    def bare():
        for _ in range(steps):
            model(z, logsnr)

    def sampler():
        sample(model, shape, schedule, steps, seeds=range(batch), progress=False)

    bare(), sampler()                                   # warm-up
    pairs = []
    while len(pairs) < min_reps or sum(s + b for s, b in pairs) < seconds:
        pairs.append((once(sampler), once(bare)))
    sec = statistics.median(s for s, _ in pairs)
    return dict(batch=batch, steps=steps, ms_per_step=1e3 * sec / steps, img_per_s=batch / sec,
                overhead=statistics.median(s / b for s, b in pairs) - 1)


def bench_fid(batch: int, min_reps: int, seconds: float, res: int = 32, d: int = 2048) -> dict:
    """Inception features of generated-size images (each is resized to 299, so res barely matters) and
    the trace term tr((S1 S2)^(1/2)) of two random d x d covariances (float64, eigendecompositions)."""
    torch.manual_seed(0)
    model = inception.InceptionV3().eval()
    images = torch.rand(batch, 3, res, res) * 2 - 1
    sec = statistics.median(repeat_timed(lambda: fid.compute_stats_from_tensors([images], model, batch_size=batch),
                                         min_reps, seconds))
    rng = np.random.default_rng(0)
    f1, f2 = rng.standard_normal((2, d + 100, d))
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2 + 0.1 * f1, rowvar=False)
    trace_s = once(lambda: fid.trace_sqrt_product(s1, s2))
    return dict(features_img_per_s=batch / sec, trace_term_s=trace_s, dims=d)


# ----------------------------------------------------------------------------------------------------
# Report.

def cpu_ticks() -> tuple[int, int, int] | None:
    """(all CPU time, busy CPU time, this process's CPU time) so far, in clock ticks, from /proc (Linux;
    None elsewhere). Two readings tell how busy *other* processes kept the cores in between, which the
    load average cannot: it lags by minutes and counts this process too."""
    try:
        with open("/proc/stat") as fh:
            cpu = [int(v) for v in fh.readline().split()[1:]]
        with open("/proc/self/stat") as fh:
            mine = fh.read().rsplit(")", 1)[1].split()               # fields 3.. of proc(5)
        return sum(cpu), sum(cpu) - cpu[3] - cpu[4], int(mine[11]) + int(mine[12])   # idle, iowait; utime, stime
    except (OSError, ValueError, IndexError):
        return None


def others_busy(start, end) -> float:
    """Cores that other processes kept busy, on average, between two cpu_ticks() readings (NaN if unknown)."""
    if start is None or end is None:
        return float("nan")
    total, busy, mine = (b - a for a, b in zip(start, end))
    return os.cpu_count() * (busy - mine) / max(total, 1)


def busy_cores(seconds: float = 1.0) -> float:
    """Cores other processes keep busy right now (measured over `seconds`)."""
    start = cpu_ticks()
    time.sleep(seconds)
    return others_busy(start, cpu_ticks())


def machine_info() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                isa=torch.backends.cpu.get_cpu_capability(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
                busy_cores_start=busy_cores())


def print_train_row(r: dict) -> None:
    print(f"| {r['model']} | {r['preset']} | {r['res']} | {r['batch']} | {r['params'] / 1e6:.2f}M | "
          f"{r['gflops_per_img']:.3f} | {r['img_per_s']:.1f} | {r['gflops_per_s']:.0f} | {100 * r['frac_peak']:.0f}% | "
          f"{100 * r['frac_mm']:.0f}% | {100 * r['dense_share']:.0f}% | {r['activation_mb']:.0f} | "
          f"{r['step_peak_mb']:.0f} | {r['others_busy_cores']:.1f} |", flush=True)


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    quick = cfg.quick
    min_reps, seconds = (3, cfg.seconds / 4) if quick else (5, cfg.seconds)
    results, run_start = dict(machine=machine_info(), config=asdict(cfg)), cpu_ticks()
    m = results["machine"]
    policy = f", OMP_WAIT_POLICY={m['omp_wait_policy']}" if m["omp_wait_policy"] else ""
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['isa']}), {m['threads']} thread(s){policy}; "
          f"other processes busy on {m['busy_cores_start']:.1f} cores")
    if m["busy_cores_start"] > 0.2:
        spinning = m["threads"] > 1 and m["omp_wait_policy"].lower() != "passive"
        print("note: the cores are shared, so are the timings" + (
            "; OpenMP threads that spin-wait for a descheduled sibling can make small kernels many times "
            "slower: rerun with OMP_WAIT_POLICY=PASSIVE or --threads 1" if spinning else ""))
    peak = results["peak"] = measure_peak(min_reps)
    print(f"fp32 peak: torch.mm (MKL) {peak['mm_gflops']:.0f} GFLOP/s, oneDNN {peak['onednn_gflops']:.0f} GFLOP/s "
          f"-> peak {peak['peak_gflops']:.0f} GFLOP/s")

    print("\n| model | preset | res | batch | params | fwd+bwd GFLOP/img | train img/s | GFLOP/s | % of peak "
          "| % of mm | conv+mm+attn time | activations MB | step peak MB | cores used by others |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cases = [(*QUICK_CASES[0][:3], cfg.batch_size)] + (QUICK_CASES if quick else TRAIN_CASES)[1:]
    results["train"] = []
    for case in cases:
        start = cpu_ticks()
        results["train"].append(bench_train(*case, min_reps, seconds))
        results["train"][-1]["others_busy_cores"] = others_busy(start, cpu_ticks())
        print_train_row(results["train"][-1])
    default = results["train"][0]
    where = f"{default['model']}/{default['preset']}/{default['res']}"
    print()

    if not quick:
        with empty_inductor_cache():
            c = results["compile"] = bench_compile(*cases[0], 3, seconds)
        print(f"torch.compile ({where}, batch {cfg.batch_size}): eager {c['eager_img_per_s']:.1f} img/s, "
              f"compiled {c['compiled_img_per_s']:.1f} img/s ({c['speedup']:.2f}x), compile time "
              f"{c['compile_time_s']:.0f} s", flush=True)
        k = results["checkpointing"] = bench_checkpointing(*CKPT_CASE, 2)
        print(f"activation checkpointing ({'/'.join(map(str, CKPT_CASE[:3]))}, batch {CKPT_CASE[3]}): activations "
              f"{k['plain']['activation_mb']:.0f} -> {k['checkpointed']['activation_mb']:.0f} MB "
              f"({k['activation_reduction']:.1f}x less), step peak {k['plain']['step_peak_mb']:.0f} -> "
              f"{k['checkpointed']['step_peak_mb']:.0f} MB ({k['peak_reduction']:.1f}x less), step time "
              f"x{k['time_ratio']:.2f}", flush=True)

        w = results["save"] = bench_save()
        print(f"checkpoint save ({w['gb']:.1f} GB): synchronous {w['sync_s']:.2f} s; background writer blocks "
              f"training {w['blocking_s']:.2f} s ({100 * w['blocking_fraction']:.0f}%; the first save "
              f"{w['first_blocking_s']:.2f} s), then writes for "
              f"{w['background_s']:.2f} s beside it", flush=True)

    s = results["sample"] = bench_sample(*cases[0][:3], 16, 8 if quick else 32, min_reps, seconds)
    print(f"sampling ({where}, batch {s['batch']}, {s['steps']} steps): {s['ms_per_step']:.1f} ms/step, "
          f"{s['img_per_s']:.2f} img/s, overhead over bare forwards {100 * s['overhead']:+.1f}%", flush=True)
    f = results["fid"] = bench_fid(8 if quick else 16, 1 if quick else 3, seconds / 2)
    print(f"FID: Inception features {f['features_img_per_s']:.1f} img/s (resized to 299), trace term at "
          f"d = {f['dims']}: {f['trace_term_s']:.2f} s")

    m["others_busy_run"] = others_busy(run_start, cpu_ticks())
    if cfg.json:
        with open(cfg.json, "w") as fh:
            json.dump(results, fh, indent=2)
    print(f"other processes kept {m['others_busy_run']:.1f} cores busy on average during the run")
    print(f"default preset ({where}x{default['res']}, batch {default['batch']}): {100 * default['frac_peak']:.0f}% of "
          f"the measured fp32 peak ({100 * default['frac_mm']:.0f}% of the torch.mm peak)")


if __name__ == "__main__":
    main()
